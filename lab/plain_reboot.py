"""An operator's plain ``systemctl reboot`` at each phase of an update, in one VM of four boots.

* boot 1, idle after ``liveupdatectl load-kernel``: the agent keeps no image in the kernel while
  idle (systemd >= 256's logind would turn the reboot into a kexec into it), so the reboot is an
  ordinary one: QEMU resets the machine and the same kernel boots again (the VM runs without
  ``-no-reboot`` for this).
* boot 2, an update prepared (the image loaded under its marker): a logind block inhibitor of
  shutdown makes Check() say so and Execute refuse; then ``systemctl reboot``.
* boot 3, an update freezing (a freeze hook that waits): ``systemctl reboot``.
* boot 4: what is left.

Every boot records what the tests read: the command line (a kexec'd boot carries the agent's
``luo_agent.update=`` marker), the agent's status and history, the failed units, the session
probes.  journald forwards the journal to the console, which the host keeps (``serial.log``):
the order in which the shutdowns stopped the agent and the bus.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from pathlib import Path

from .liveupdate import SESSIONS, Scenario

# Holds liveupdate-freeze.target's start job until the shutdown stops it.
WAITING_FREEZE_UNIT = """\
[Unit]
Description=lab: a freeze hook that waits
Before=liveupdate-freeze.target shutdown.target
Conflicts=shutdown.target
PartOf=liveupdate-freeze.target
DefaultDependencies=no

[Service]
Type=oneshot
ExecStart=/bin/sleep 600

[Install]
RequiredBy=liveupdate-freeze.target
"""

JOURNAL_TO_CONSOLE = """\
[Journal]
ForwardToConsole=yes
TTYPath=/dev/console
MaxLevelConsole=info
"""

# A unit that keeps memfds in its fd store, to see PID 1's store rules on the real thing: the
# same open file pushed twice, three fds in one message with room for two; its store carried by a
# kexec through PID 1 into a boot whose FileDescriptorStoreMax= is 1 (boot 3, a drop-in).
FDSTORE_SCRIPT = """\
import array, os, socket, time
address = os.environ["NOTIFY_SOCKET"]
address = "\\0" + address[1:] if address.startswith("@") else address
def send(text, fds=()):
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
        s.sendmsg([text.encode()], rights, 0, address)
def memfd(data):
    fd = os.memfd_create("lab-fdstore")
    os.write(fd, data)
    return fd
if not os.environ.get("LISTEN_FDS"):
    once = memfd(b"once")
    send("FDSTORE=1\\nFDNAME=first", [once])
    send("FDSTORE=1\\nFDNAME=again", [once])
    send("FDSTORE=1\\nFDNAME=three", [memfd(b"1"), memfd(b"2"), memfd(b"3")])
send("READY=1")
while True:
    time.sleep(3600)
"""

FDSTORE_UNIT = """\
[Unit]
Description=lab: a unit keeping memfds in its fd store
[Service]
Type=notify
ExecStart=/usr/bin/python3 /usr/local/lib/lab-fdstore.py
FileDescriptorStoreMax=3
FileDescriptorStorePreserve=yes
[Install]
WantedBy=multi-user.target
"""

AGENT_DESCRIPTION = "Live Update Orchestrator agent"
BUS_DESCRIPTION = "D-Bus System Message Bus"


def plain_reboot_job(kernel: Path, last_boot: int = 4) -> str:
    """The job; it ends in boot ``last_boot`` after recording it (2: only the idle reboot)."""
    probe = " ".join(SESSIONS)
    return f"""\
record() {{
    wait_active luo-agent.service || exit 10
    # Whatever the agent does at start-up (a cancel it finishes, an update it records) is done
    # once it answers with an idle status.
    n=0
    until liveupdatectl --json status > "$out/status.$LAB_BOOT.json" 2>/dev/null \\
        && grep -q '"Phase": "idle"' "$out/status.$LAB_BOOT.json"; do
        n=$((n + 1)); [ $n -gt 120 ] && break
        sleep 1
    done
    cat /proc/cmdline > "$out/cmdline.$LAB_BOOT"
    liveupdatectl --json history --limit 5 > "$out/history.$LAB_BOOT.json"
    lab probe {probe} > "$out/probe.$LAB_BOOT.json"
    systemctl --failed --no-legend --plain > "$out/failed.$LAB_BOOT.txt"
    systemctl show -p Version -p KExecsCount -p KExecCount > "$out/manager.$LAB_BOOT.txt" || true
    systemctl show -p NFileDescriptorStore --value lab-fdstore.service \
        > "$out/fdstore.$LAB_BOOT.count"
    journalctl -b --no-pager -o cat -u lab-fdstore.service > "$out/fdstore.$LAB_BOOT.log"
    save_journal
}}
loaded() {{ cat /sys/kernel/kexec_loaded > "$out/kexec_loaded.$LAB_BOOT.$1"; }}
plain_reboot() {{
    mark reboot "$(date +%s.%N)"
    systemctl reboot
    sleep 600
    exit 14
}}
ready
record
[ "$LAB_BOOT" -ge {last_boot} ] && exit 0
case "$LAB_BOOT" in
1)
    liveupdatectl load-kernel {kernel} --reuse-cmdline || exit 12
    loaded idle
    plain_reboot
    ;;
2)
    liveupdatectl load-kernel {kernel} --reuse-cmdline || exit 12
    liveupdatectl --json prepare --wait > "$out/prepare.json" || {{ save_journal; exit 13; }}
    loaded prepared
    lab probe {probe} > "$out/probe.prepared.json"
    # An fwupd-style block lock on shutdown: Check() names it and Execute is refused.
    systemd-inhibit --what=shutdown --mode=block --who=lab-firmware --why="flashing" sleep 600 &
    inhibitor=$!
    sleep 2
    liveupdatectl check > "$out/check.inhibited.txt" 2>&1
    liveupdatectl execute > "$out/execute.inhibited.txt" 2>&1
    echo $? > "$out/execute.inhibited.rc"
    kill $inhibitor
    plain_reboot
    ;;
3)
    liveupdatectl load-kernel {kernel} --reuse-cmdline || exit 12
    liveupdatectl --json update > "$out/update.json" || {{ save_journal; exit 13; }}
    n=0
    until liveupdatectl --json status | grep -q '"Phase": "freezing"'; do
        n=$((n + 1)); [ $n -gt 120 ] && {{ save_journal; exit 15; }}
        sleep 0.5
    done
    systemctl is-active lab-waiting-freeze.service > "$out/freeze-hook.3" || true
    loaded freezing
    plain_reboot
    ;;
esac
"""


PLAIN_REBOOT = Scenario(
    "plain-reboot",
    plain_reboot_job,
    2400.0,
    {"lab-waiting-freeze.service": WAITING_FREEZE_UNIT, "lab-fdstore.service": FDSTORE_UNIT},
    setup=(
        'mkdir -p "$root/etc/systemd/journald.conf.d" "$root/usr/local/lib"\n'
        "cat > \"$root/etc/systemd/journald.conf.d/lab-console.conf\" <<'CONF'\n"
        f"{JOURNAL_TO_CONSOLE}CONF\n"
        "cat > \"$root/usr/local/lib/lab-fdstore.py\" <<'PY'\n"
        f"{FDSTORE_SCRIPT}PY\n"
        'if [ "$LAB_BOOT" = 3 ]; then\n'
        '    mkdir -p "$root/etc/systemd/system/lab-fdstore.service.d"\n'
        "    printf '[Service]\\nFileDescriptorStoreMax=1\\n' \\\n"
        '        > "$root/etc/systemd/system/lab-fdstore.service.d/smaller.conf"\n'
        "fi\n"
    ),
    reboots=True,
)
# Boots 1 and 2 only: the reboot of an idle agent after LoadKernel (tests/vm/test_plain_reboot.py).
IDLE_REBOOT = dataclasses.replace(
    PLAIN_REBOOT,
    name="plain-reboot-idle",
    job=functools.partial(plain_reboot_job, last_boot=2),
    timeout=1200.0,
)


def boot_sections(serial: str) -> dict[int, str]:
    """The console of each boot (init.sh prints ``lab: boot N`` first)."""
    starts = [(int(m.group(1)), m.start()) for m in re.finditer(r"lab: boot (\d+),", serial)]
    ends = [start for _boot, start in starts[1:]] + [len(serial)]
    return {boot: serial[start:end] for (boot, start), end in zip(starts, ends, strict=True)}


def stop_order(console: str) -> list[str]:
    """Which of the agent and the bus PID 1 reported stopped, in order (journal lines and
    status lines on the console alike)."""
    order: list[str] = []
    for line in console.splitlines():
        if "Stopped" not in line:
            continue
        for what, description in (("agent", AGENT_DESCRIPTION), ("bus", BUS_DESCRIPTION)):
            if description in line and what not in order:
                order.append(what)
    return order
