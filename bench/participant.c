/* A compiled live-update participant for the real-kernel benchmark (bench/real_kernel.py), so that
 * the figure shows the agent's share of the restore path and not an interpreter's start.
 *
 * The same workload data (a memfd of SIZE bytes from a random seed, its file position at a third)
 * goes through the live update one of two ways:
 *
 *   agent-preserve DIR   the agent's path: Preserve(h, s, t, a{sv}) over the system bus (sd-bus)
 *   agent-restore DIR    after the kexec: Retrieve(s, t) from the agent, then verify
 *   bare-preserve DIR    no agent (the kernel selftest's way): create a session on /dev/liveupdate,
 *                        preserve the memfd, and leave a child holding the session until the kexec
 *   bare-restore DIR     after the kexec: retrieve the session and the memfd, verify, finish
 *
 * DIR keeps "expected" (seed, size, position) across the kexec and receives "verified".  Every byte
 * and the position are compared; any difference (or failure) exits non-zero.
 *
 * Built at bench time: gcc -O2 participant.c -I<dir with linux/liveupdate.h> -lsystemd
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/liveupdate.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <systemd/sd-bus.h>
#include <time.h>
#include <unistd.h>

#define SIZE (4u << 20)
#define TOKEN 1
#define AGENT_SESSION "bench-c"
#define BARE_SESSION "bench-bare"

static void die(const char *what, int err)
{
	fprintf(stderr, "participant: %s: %s\n", what, strerror(err));
	exit(1);
}

static uint64_t next(uint64_t *x)
{
	*x ^= *x << 13;
	*x ^= *x >> 7;
	*x ^= *x << 17;
	return *x;
}

static void fill(uint8_t *buf, uint64_t seed)
{
	uint64_t x = seed | 1;
	for (size_t i = 0; i < SIZE; i += 8) {
		uint64_t v = next(&x);
		memcpy(buf + i, &v, 8);
	}
}

static char *path_in(const char *dir, const char *name)
{
	char *path;
	if (asprintf(&path, "%s/%s", dir, name) < 0)
		die("asprintf", ENOMEM);
	return path;
}

/* A memfd of SIZE seeded bytes, its position at a third; the seed, size and position to DIR. */
static int make_workload(const char *dir)
{
	uint64_t seed;
	if (getrandom(&seed, sizeof(seed), 0) != sizeof(seed))
		die("getrandom", errno);
	int fd = memfd_create("bench-participant", MFD_CLOEXEC);
	if (fd < 0)
		die("memfd_create", errno);
	uint8_t *buf = malloc(SIZE);
	if (!buf)
		die("malloc", ENOMEM);
	fill(buf, seed);
	for (size_t done = 0; done < SIZE;) {
		ssize_t n = write(fd, buf + done, SIZE - done);
		if (n < 0)
			die("write memfd", errno);
		done += (size_t)n;
	}
	free(buf);
	if (lseek(fd, SIZE / 3, SEEK_SET) < 0)
		die("lseek", errno);
	char *path = path_in(dir, "expected");
	FILE *f = fopen(path, "w");
	if (!f || fprintf(f, "%" PRIu64 " %u %u\n", seed, SIZE, SIZE / 3) < 0 || fsync(fileno(f)) ||
	    fclose(f))
		die(path, errno);
	free(path);
	return fd;
}

/* Every byte, the size and the position of the retrieved memfd against DIR/expected. */
static void verify(const char *dir, int fd, const char *how)
{
	uint64_t seed;
	unsigned size, pos;
	char *path = path_in(dir, "expected");
	FILE *f = fopen(path, "r");
	if (!f || fscanf(f, "%" SCNu64 " %u %u", &seed, &size, &pos) != 3)
		die(path, f ? EINVAL : errno);
	fclose(f);
	struct stat st;
	if (fstat(fd, &st))
		die("fstat", errno);
	off_t got_pos = lseek(fd, 0, SEEK_CUR);
	uint8_t *want = malloc(SIZE), *got = malloc(SIZE);
	if (!want || !got)
		die("malloc", ENOMEM);
	fill(want, seed);
	ssize_t n = st.st_size == SIZE ? pread(fd, got, SIZE, 0) : -1;
	int ok = size == SIZE && (size_t)st.st_size == size && got_pos == (off_t)pos &&
		 n == (ssize_t)SIZE && memcmp(want, got, SIZE) == 0;
	free(path);
	path = path_in(dir, "verified");
	f = fopen(path, "w");
	if (!f || fprintf(f, "%s %s size=%jd pos=%jd\n", ok ? "ok" : "MISMATCH", how,
			  (intmax_t)st.st_size, (intmax_t)got_pos) < 0 || fclose(f))
		die(path, errno);
	if (!ok) {
		fprintf(stderr, "participant: data mismatch (size %jd, position %jd)\n",
			(intmax_t)st.st_size, (intmax_t)got_pos);
		exit(2);
	}
	printf("participant: verified %u bytes at position %u (%s)\n", size, pos, how);
}

static sd_bus *system_bus(void)
{
	sd_bus *bus;
	int r = sd_bus_open_system(&bus);
	if (r < 0)
		die("sd_bus_open_system", -r);
	return bus;
}

static void agent_call_failed(const char *method, sd_bus_error *err, int r)
{
	fprintf(stderr, "participant: %s: %s: %s\n", method, err->name ? err->name : "",
		err->message ? err->message : strerror(-r));
	exit(1);
}

static void agent_preserve(const char *dir)
{
	int fd = make_workload(dir);
	sd_bus *bus = system_bus();
	sd_bus_error err = SD_BUS_ERROR_NULL;
	sd_bus_message *reply = NULL;
	int r = sd_bus_call_method(bus, "org.luoagent.LiveUpdate1", "/org/luoagent/LiveUpdate1",
				   "org.luoagent.LiveUpdate1.Manager", "Preserve", &err, &reply,
				   "hsta{sv}", fd, AGENT_SESSION, (uint64_t)TOKEN, 0);
	if (r < 0)
		agent_call_failed("Preserve", &err, r);
	printf("participant: preserved %u bytes with the agent\n", SIZE);
}

static void agent_restore(const char *dir)
{
	sd_bus *bus = system_bus();
	sd_bus_error err = SD_BUS_ERROR_NULL;
	sd_bus_message *reply = NULL;
	int r = sd_bus_call_method(bus, "org.luoagent.LiveUpdate1", "/org/luoagent/LiveUpdate1",
				   "org.luoagent.LiveUpdate1.Manager", "Retrieve", &err, &reply,
				   "st", AGENT_SESSION, (uint64_t)TOKEN);
	if (r < 0)
		agent_call_failed("Retrieve", &err, r);
	int fd;
	r = sd_bus_message_read(reply, "h", &fd);
	if (r < 0)
		die("reading Retrieve's answer", -r);
	verify(dir, fd, "through the agent");
}

static int open_device(void)
{
	/* The agent (installed beside) opens the exclusive device for single operations. */
	for (int attempt = 0; attempt < 400; attempt++) {
		int dev = open("/dev/liveupdate", O_RDWR | O_CLOEXEC);
		if (dev >= 0)
			return dev;
		if (errno != EBUSY)
			die("open /dev/liveupdate", errno);
		usleep(25000);
	}
	die("open /dev/liveupdate", EBUSY);
	return -1;
}

static void bare_preserve(const char *dir)
{
	int dev = open_device();
	struct liveupdate_ioctl_create_session create = {.size = sizeof(create), .fd = -1};
	strcpy((char *)create.name, BARE_SESSION);
	if (ioctl(dev, LIVEUPDATE_IOCTL_CREATE_SESSION, &create))
		die("CREATE_SESSION", errno);
	int fd = make_workload(dir);
	struct liveupdate_session_preserve_fd preserve = {
		.size = sizeof(preserve), .fd = fd, .token = TOKEN};
	if (ioctl(create.fd, LIVEUPDATE_SESSION_PRESERVE_FD, &preserve))
		die("PRESERVE_FD", errno);
	close(fd);
	close(dev);
	/* The session lives as long as its fd: a child holds it until the kexec. */
	pid_t child = fork();
	if (child < 0)
		die("fork", errno);
	if (child > 0) {
		printf("participant: preserved %u bytes in session %s (held by %d)\n", SIZE,
		       BARE_SESSION, child);
		exit(0);
	}
	setsid();
	for (;;)
		pause();
}

static void bare_restore(const char *dir)
{
	int dev = open_device();
	struct liveupdate_ioctl_retrieve_session session = {.size = sizeof(session), .fd = -1};
	strcpy((char *)session.name, BARE_SESSION);
	if (ioctl(dev, LIVEUPDATE_IOCTL_RETRIEVE_SESSION, &session))
		die("RETRIEVE_SESSION", errno);
	close(dev);
	struct liveupdate_session_retrieve_fd retrieve = {
		.size = sizeof(retrieve), .fd = -1, .token = TOKEN};
	if (ioctl(session.fd, LIVEUPDATE_SESSION_RETRIEVE_FD, &retrieve))
		die("RETRIEVE_FD", errno);
	verify(dir, retrieve.fd, "directly from the kernel");
	struct liveupdate_session_finish finish = {.size = sizeof(finish)};
	if (ioctl(session.fd, LIVEUPDATE_SESSION_FINISH, &finish))
		die("SESSION_FINISH", errno);
}

int main(int argc, char **argv)
{
	if (argc != 3) {
		fprintf(stderr, "usage: %s agent-preserve|agent-restore|bare-preserve|bare-restore DIR\n",
			argv[0]);
		return 64;
	}
	const char *mode = argv[1], *dir = argv[2];
	if (!strcmp(mode, "agent-preserve"))
		agent_preserve(dir);
	else if (!strcmp(mode, "agent-restore"))
		agent_restore(dir);
	else if (!strcmp(mode, "bare-preserve"))
		bare_preserve(dir);
	else if (!strcmp(mode, "bare-restore"))
		bare_restore(dir);
	else {
		fprintf(stderr, "participant: unknown mode %s\n", mode);
		return 64;
	}
	return 0;
}
