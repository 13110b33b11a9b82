#!/bin/sh
# PID 1 of a lab VM (the kernel runs it again after every kexec: the command line is reused).
# The host's root is the read-only 9p root; an overlay with a tmpfs upper layer makes it writable
# for this boot only.  The run directory ($LAB_RUN, a writable 9p share mounted at the same path
# as on the host) carries the job, the boot counter, the logs and the exit status.
# LAB_MODE=job runs the job under this shell and powers off; LAB_MODE=systemd starts systemd as
# PID 1 with lab-job.service running the job.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export HOME=/root LANG=C.UTF-8

power_off() {
    sync
    # reboot(2) RB_POWER_OFF; if that fails, PID 1 exits, the kernel panics and panic=-1 plus
    # QEMU's -no-reboot end the VM.
    python3 -c 'import ctypes; ctypes.CDLL(None, use_errno=True).reboot(0x4321FEDC)'
    exit 1
}

mount -t proc proc /proc
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mount -t tmpfs -o mode=0755 tmpfs /run
mkdir -p /run/lab/upper /run/lab/work /run/lab/root
lower=/
if [ -n "$LAB_ROOT_TAG" ]; then
    # A root file system of its own (the sid root for systemd 262) on a second read-only share.
    mkdir -p /run/lab/lower
    mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000,ro "$LAB_ROOT_TAG" /run/lab/lower
    lower=/run/lab/lower
fi
mount -t overlay overlay -o "lowerdir=$lower,upperdir=/run/lab/upper,workdir=/run/lab/work" \
    /run/lab/root
new=/run/lab/root
mount -t proc proc "$new/proc"
mount -t sysfs sysfs "$new/sys"
mount -t devtmpfs devtmpfs "$new/dev"
mount -t tmpfs -o mode=0755 tmpfs "$new/run"
mount -t debugfs debugfs "$new/sys/kernel/debug" 2>/dev/null
if [ -n "$LAB_ROOT_TAG" ]; then
    # Under a root of its own, the host's root (the checkout, the kernel cache) is at /run/host.
    mkdir -p "$new/run/host"
    mount --bind / "$new/run/host"
fi
mkdir -p "$new$LAB_RUN"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 lab "$new$LAB_RUN"

boot=$(cat "$new$LAB_RUN/boots" 2>/dev/null || echo 0)
boot=$((boot + 1))
echo "$boot" > "$new$LAB_RUN/boots"
echo "lab: boot $boot, kernel $(cat /proc/sys/kernel/osrelease), mode ${LAB_MODE:-job}"

if [ "$LAB_MODE" = systemd ]; then
    unit_dir="$new/etc/systemd/system"
    mkdir -p "$unit_dir/multi-user.target.wants"
    # systemd-tmpfiles walks the whole 9p tree for minutes; the job needs none of it.  A tmpfs
    # on /tmp (sid's tmp.mount) would hide a run directory under /tmp; the overlay is writable
    # anyway.  No login prompts on the console the host reads.
    for unit in systemd-tmpfiles-setup.service tmp.mount serial-getty@ttyS0.service \
            getty@tty1.service; do
        ln -sf /dev/null "$unit_dir/$unit"
    done
    cat > "$unit_dir/lab-job.service" <<UNIT
[Unit]
Description=The lab job (boot $boot)
After=multi-user.target dbus.service
[Service]
Type=oneshot
Environment=LAB_RUN=$LAB_RUN LAB_BOOT=$boot LAB_MODE=systemd PATH=$PATH
ExecStart=/bin/sh $LAB_RUN/run-job
StandardOutput=journal+console
StandardError=journal+console
[Install]
WantedBy=multi-user.target
UNIT
    ln -sf ../lab-job.service "$unit_dir/multi-user.target.wants/lab-job.service"
    if [ -f "$new$LAB_RUN/systemd-setup" ]; then
        LAB_BOOT=$boot sh "$new$LAB_RUN/systemd-setup" "$new"
    fi
    cd "$new" || power_off
    mkdir -p oldroot
    pivot_root . oldroot || power_off
    exec chroot . /bin/sh -c 'umount -l /oldroot; rmdir /oldroot; exec /lib/systemd/systemd --system'
fi

cd "$new" || power_off
mkdir -p oldroot
pivot_root . oldroot || power_off
umount -l /oldroot 2>/dev/null
cd /
LAB_BOOT=$boot LAB_MODE=job sh "$LAB_RUN/run-job"
power_off
