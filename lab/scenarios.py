"""The lab's live-update scenarios: each a shell job run in the systemd VM after its set-up
(``lab/guest_setup.py``), with the units it adds (``SCENARIOS``).  Every job starts with
``JOB_HEAD``: its shell helpers, among them ``lab``, the in-VM commands of ``lab/in_vm.py``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path

from .rootfs import PRIVATE_ENV, REPO

# The participant's session (luo_agent/examples/participant.py) and the agent's own.
SESSIONS = ("example", "luo-agent")

FAILING_FREEZE_UNIT = """\
# A participant whose freeze hook fails: by then the kernel holds the preserved sessions.
[Unit]
Description=lab: a freeze hook that fails
Before=liveupdate-freeze.target
PartOf=liveupdate-freeze.target
DefaultDependencies=no

[Service]
Type=oneshot
ExecStart=/bin/sh -c 'echo "lab: this freeze hook fails on purpose"; exit 3'

[Install]
RequiredBy=liveupdate-freeze.target
"""


TIMELINE_FIELDS = (
    "MESSAGE,MESSAGE_ID,UNIT,_SYSTEMD_UNIT,_TRANSPORT,SYSLOG_IDENTIFIER,_SOURCE_MONOTONIC_TIMESTAMP"
)
JOB_HEAD = """\
REPO={repo}
PY={python}
out=$LAB_RUN
mark() {{ echo "lab-mark: $*" > /dev/console; }}
wait_active() {{
    n=0
    until systemctl is-active --quiet "$1"; do
        n=$((n + 1))
        if [ $n -gt 120 ]; then systemctl status --no-pager "$1"; return 1; fi
        sleep 1
    done
}}
lab() {{ (cd "$REPO" && "$PY" -m lab.in_vm "$@"); }}
save_journal() {{
    journalctl -b --no-pager -o short-precise -u luo-agent.service -u liveupdate.service \\
        -u 'luo-example-*' -u 'lab-*' > "$out/journal.$LAB_BOOT.log"
    # The whole boot with both clocks of every entry: the per-step timeline (``timeline``).
    journalctl -b --no-pager -o json --output-fields={timeline_fields} \\
        > "$out/journal.$LAB_BOOT.json"
}}
ready() {{
    wait_active luo-agent.service || exit 10
    {wait_workload}
}}
"""


def whole_update_job(kernel: Path, *, before_update: str = "", after_update: str = "") -> str:
    """``before_update``: shell text of the first boot once the agent is up; ``after_update``:
    of the new boot once the update ended."""
    return f"""\
if [ "$LAB_BOOT" = 1 ]; then
    ready
{before_update}    liveupdatectl --json status > "$out/status.before.json"
    liveupdatectl load-kernel {kernel} --reuse-cmdline || exit 12
    liveupdatectl check || exit 13
    # Everything up to the kexec (the journal of this boot is gone afterwards).
    journalctl -f -b -n all -o short-precise -u luo-agent.service -u liveupdate.service \\
        -u 'luo-example-*' > "$out/journal.1.log" &
    mark clock "$(date +%s.%N)"
    systemctl start liveupdate.service
    rc=$?
    # direct custody: the agent's reboot(KEXEC) ends this boot inside the call.  systemd
    # custody: kexec.target, queued in replace-irreversibly mode, may cancel this very start
    # job (rc 1) or let it finish (rc 0); either way PID 1 ends the boot shortly.
    echo "lab: liveupdate.service returned $rc"
    if [ $rc = 0 ] || [ "$(systemctl is-system-running)" = stopping ]; then sleep 300; fi
    echo "lab: no kexec"
    exit 14
fi
mark clock "$(date +%s.%N)"
cat /proc/cmdline > "$out/cmdline.$LAB_BOOT"
lab wait-ended --timeout 240 > "$out/status.after.json" || {{ save_journal; exit 20; }}
{after_update}liveupdatectl --json history --limit 5 > "$out/history.json"
lab probe {" ".join(SESSIONS)} > "$out/probe.agent-running.json"
systemctl stop luo-agent.service
lab probe {" ".join(SESSIONS)} > "$out/probe.agent-stopped.json"
save_journal
"""


def failing_participant_job(kernel: Path) -> str:
    return f"""\
ready
liveupdatectl load-kernel {kernel} --reuse-cmdline || exit 12
systemctl start liveupdate.service
echo $? > "$out/liveupdate-service.rc"
lab wait-ended --timeout 120 > "$out/status.after.json" || {{ save_journal; exit 20; }}
liveupdatectl --json history --limit 5 > "$out/history.json"
lab probe {" ".join(SESSIONS)} > "$out/probe.agent-running.json"
systemctl stop luo-agent.service
lab probe {" ".join(SESSIONS)} > "$out/probe.agent-stopped.json"
save_journal
"""


def killed_agent_job(kernel: Path) -> str:
    return f"""\
ready
liveupdatectl load-kernel {kernel} --reuse-cmdline || exit 12
liveupdatectl --json prepare --wait > "$out/prepare.json" || {{ save_journal; exit 13; }}
lab probe {" ".join(SESSIONS)} > "$out/probe.prepared.json"
pid=$(systemctl show -p MainPID --value luo-agent.service)
kill -KILL "$pid"
while [ -d "/proc/$pid" ]; do sleep 0.1; done
lab probe {" ".join(SESSIONS)} > "$out/probe.killed.json"
wait_active luo-agent.service || exit 15
lab wait-ended --timeout 120 > "$out/status.after.json" || {{ save_journal; exit 20; }}
liveupdatectl --json history --limit 5 > "$out/history.json"
save_journal
"""


def no_kernel_job(kernel: Path) -> str:
    del kernel  # never loaded: that is the point
    return f"""\
ready
liveupdatectl --json update --wait > "$out/update.json" 2> "$out/update.stderr"
echo $? > "$out/update.rc"
liveupdatectl --json status > "$out/status.after.json"
liveupdatectl --json history --limit 5 > "$out/history.json"
lab probe {" ".join(SESSIONS)} > "$out/probe.agent-running.json"
save_journal
"""


# The baseline of the benchmark: the kernel's own selftest path in the same VM, with the same
# package installed and running.  Its stage 2 is a plain service ordered like any other, so the
# interval kexec call -> verified fd has everything but the agent's own work.
STAGE2_UNIT = """\
[Unit]
Description=lab: the kernel selftest's stage 2 (the benchmark's baseline)
[Service]
Type=oneshot
EnvironmentFile=/etc/lab.env
ExecCondition=/bin/sh -c 'test -e "$LAB_RUN/stage1.done"'
ExecStart=/bin/sh -c '"$LAB_RUN/luo_kexec_simple" --stage 2 > "$LAB_RUN/stage2.log" 2>&1'
ExecStartPost=/bin/sh -c 'echo "lab-mark: restored $(date +%%s.%%N)" > /dev/console'
[Install]
WantedBy=multi-user.target
"""


def selftest_baseline_job(kernel: Path) -> str:
    selftests = kernel.parent / "selftests"
    return f"""\
if [ "$LAB_BOOT" = 1 ]; then
    ready
    cp {selftests}/luo_kexec_simple "$out/"
    "$out/luo_kexec_simple" --stage 1 > "$out/stage1.log" 2>&1 || exit 12
    touch "$out/stage1.done"
    kexec -l -s --reuse-cmdline {kernel} || exit 13
    mark clock "$(date +%s.%N)"
    mark kexec-call "$(date +%s.%N)"
    kexec -e
    exit 14
fi
n=0
until grep -q "PASSED" "$out/stage2.log" 2>/dev/null; do
    n=$((n + 1)); [ $n -gt 240 ] && exit 20
    sleep 0.5
done
save_journal
"""


# systemd 262 only (the sid root): a unit with its own LUO session next to the agent's
# participants.  Ordered before the agent: both open the single-open device at start-up, and PID 1
# does not retry a LUOSession= start that meets EBUSY (docs/architecture.md).
LUOSESSION_UNIT = f"""\
[Unit]
Description=lab: a service with its own LUO session (LUOSession=)
Before=luo-agent.service
[Service]
Type=simple
EnvironmentFile=/etc/lab.env
WorkingDirectory=/run/host{REPO}
ExecStart={PRIVATE_ENV}/bin/python3 -m lab.in_vm luosession
LUOSession=labsess
FileDescriptorStorePreserve=yes
FileDescriptorStoreMax=4
[Install]
WantedBy=multi-user.target
"""


def luosession_job(kernel: Path) -> str:
    wait_preserved = (
        'if [ "$LAB_BOOT" = 1 ]; then\n'
        "    n=0\n"
        '    until test -s "$out/luosession.preserved"; do\n'
        "        n=$((n + 1))\n"
        "        [ $n -gt 120 ] && { systemctl status lab-luosession.service; exit 31; }\n"
        "        sleep 0.5\n"
        "    done\n"
        "fi\n"
    )
    return (
        wait_preserved
        + whole_update_job(kernel)
        + 'grep -qx ok "$out/luosession.verified" || { save_journal; exit 30; }\n'
    )


def manual_kexec_job(kernel: Path) -> str:
    """An operator runs ``systemctl kexec`` while an update is prepared."""
    return f"""\
if [ "$LAB_BOOT" = 1 ]; then
    ready
    liveupdatectl load-kernel {kernel} --reuse-cmdline || exit 12
    liveupdatectl --json prepare --wait > "$out/prepare.json" || {{ save_journal; exit 13; }}
    lab probe {" ".join(SESSIONS)} > "$out/probe.prepared.json"
    journalctl -f -b -n all -o short-precise -u luo-agent.service \\
        -u 'luo-example-*' > "$out/journal.1.log" &
    systemctl kexec
    sleep 600
    exit 14
fi
wait_active luo-agent.service || exit 15
sleep 5
liveupdatectl --json status > "$out/status.after.json"
liveupdatectl --json history --limit 5 > "$out/history.json"
lab probe {" ".join(SESSIONS)} > "$out/probe.after-kexec.json"
save_journal
"""


@dataclass(frozen=True)
class Scenario:
    name: str
    job: Callable[[Path], str]  # the job, given the kernel image to switch to
    # Seconds for the whole VM run: about 2.5x what a quiet 2-core host needs (TCG is slowed
    # down by every other process on the host).
    timeout: float
    extra_units: dict[str, str] = field(default_factory=dict)
    # The rest by name only: a positional one once went to the wrong field (a unit name became
    # set-up shell text, the set-up failed before its end mark and skewed a benchmark).
    _: KW_ONLY
    # The example participant (Python) is enabled; without it, ``extra_units`` bring their own.
    example: bool = True
    # More set-up shell text for every boot (``systemd_setup``), e.g. a participant's config.
    setup: str = ""
    # The unit whose start is the participant's start in the new boot (``timeline``).
    participant_unit: str = "luo-example-restore.service"
    # A disk with a page cache at DISK_MOUNT (see there).
    disk: bool = False
    # An ordinary reboot boots the VM again (else it ends the VM): lab/vm.py's ``reboots``.
    reboots: bool = False


SCENARIOS = {
    s.name: s
    for s in (
        Scenario("whole-update", whole_update_job, 600.0),
        Scenario(
            "failing-participant",
            failing_participant_job,
            360.0,
            {"lab-failing-freeze.service": FAILING_FREEZE_UNIT},
        ),
        Scenario("killed-agent", killed_agent_job, 360.0),
        Scenario("no-kernel", no_kernel_job, 360.0),
        Scenario(
            "luosession-alongside",
            luosession_job,
            600.0,
            {"lab-luosession.service": LUOSESSION_UNIT},
        ),
        Scenario("manual-kexec-while-prepared", manual_kexec_job, 600.0),
        Scenario(
            "selftest-baseline",
            selftest_baseline_job,
            600.0,
            {"lab-stage2.service": STAGE2_UNIT},
        ),
    )
}
