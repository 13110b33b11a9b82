"""The lab's commands that run inside the VM: ``python -m lab.in_vm COMMAND`` (the jobs' ``lab``
shell function, the units' ``ExecStart=``).

This is the one module of ``lab/`` that imports the project: ``/dev/liveupdate`` is reached with
``luo_agent.kernel.syscalls`` and the raw ioctls of ``tests/kernel/luo_raw.py``, the fleet's host
id with ``luo_agent.fleet.identity``.  It imports them inside the commands that need them, so
that the host side, which imports ``probe`` from here (``lab/soak.py``), never loads the project
(``tests/unit/test_layers.py``).

* ``probe NAME...``: what RETRIEVE_SESSION and CREATE_SESSION answer for each session name.
* ``wait-ended``: the agent's status once it is idle with a finished update.
* ``limit STEP_MIB STEPS_FILE``: memfds preserved until the kernel refuses (``lab/bigmem.py``).
* ``luosession``: the service with a LUO session of its own through systemd 262's
  ``LUOSession=`` (``LUOSESSION_UNIT`` in ``lab/scenarios.py``).
* ``host-id``, ``fleet-app-id``: the fleet's id of this machine and the application id it is
  derived with (``lab/fleet_slot.py``).
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import IO, Any

from .rootfs import REPO

# ------------------------------------------------------------------------------ probe


def probe(names: list[str]) -> dict[str, dict[str, str]]:
    """For each session name: what RETRIEVE_SESSION and CREATE_SESSION answer ("ok" or the
    errno's name).  A created session is closed at once (an empty outgoing session vanishes)."""
    sys.path.insert(0, str(REPO))
    from luo_agent.kernel.syscalls import DEVICE_PATH, RealSyscalls
    from tests.kernel import luo_raw

    sc = RealSyscalls()
    dev = _open_device(sc, DEVICE_PATH)
    results: dict[str, dict[str, str]] = {}
    try:
        for name in names:
            results[name] = {
                op: _attempt(fn, sc, dev, name)
                for op, fn in (
                    ("retrieve", luo_raw.retrieve_session),
                    ("create", luo_raw.create_session),
                )
            }
    finally:
        os.close(dev)
    return results


def _open_device(sc: Any, path: str) -> int:
    deadline = time.monotonic() + 10
    while True:  # the agent opens the exclusive device for single operations: retry EBUSY
        try:
            return int(sc.open(path, os.O_RDWR | os.O_CLOEXEC))
        except OSError as exc:
            if exc.errno != errno.EBUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def _attempt(fn: Any, *args: Any) -> str:
    try:
        fd = fn(*args)
    except OSError as exc:
        return errno.errorcode.get(exc.errno or 0, str(exc.errno))
    os.close(fd)
    return "ok"


# ------------------------------------------------------------------------------ wait-ended


def wait_ended(timeout: float) -> dict[str, Any]:
    """``liveupdatectl --json status`` once the agent is idle with a finished update."""
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        proc = subprocess.run(
            ["liveupdatectl", "--json", "status"], capture_output=True, text=True, check=False
        )
        if proc.returncode == 0:
            status = json.loads(proc.stdout.strip().splitlines()[-1])["status"]
            if status.get("Phase") == "idle" and status.get("LastResult", [""])[0]:
                return status
        time.sleep(0.5)
    raise TimeoutError(f"no finished update after {timeout} s; last status {status}")


# ------------------------------------------------------------------------------ limit

CHUNK = 4 << 20


def meminfo() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        name, _, rest = line.partition(":")
        fields[name] = int(rest.split()[0])
    keys = ("MemTotal", "MemFree", "MemAvailable", "Shmem", "CmaTotal", "CmaFree")
    return {k: fields.get(k, -1) for k in keys}


def limit(step_mib: int, out_file: IO[str]) -> dict[str, Any]:
    """Each step is also written to ``out_file`` at once: the OOM killer may end this process."""
    sys.path.insert(0, str(REPO))
    from luo_agent.kernel.syscalls import DEVICE_PATH, RealSyscalls
    from tests.kernel import luo_raw

    sc = RealSyscalls()
    dev = os.open(DEVICE_PATH, os.O_RDWR | os.O_CLOEXEC)
    steps: list[dict[str, Any]] = []
    held: list[tuple[int, int]] = []
    out: dict[str, Any] = {"step_mib": step_mib, "before": meminfo(), "steps": steps}
    chunk = b"\xa5" * CHUNK
    try:
        while True:
            now = meminfo()
            # Pinning moves the pages out of the KHO scratch (CMA): count only memory outside it.
            if now["MemAvailable"] - now["CmaFree"] < (step_mib + 160) << 10:
                out["stopped"] = "memory outside the KHO scratch ran low before the kernel refused"
                break
            fd = os.memfd_create(f"big-{len(held)}", os.MFD_CLOEXEC)
            for offset in range(0, step_mib << 20, CHUNK):
                os.pwrite(fd, chunk, offset)
            sess = luo_raw.create_session(sc, dev, f"big-{len(held)}")
            try:
                luo_raw.preserve_fd(sc, sess, fd, 1)
            except OSError as exc:
                name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
                steps.append({"preserved_mib": len(held) * step_mib, "refused": name})
                print(json.dumps(steps[-1]), file=out_file, flush=True)
                out["refused"] = {"errno": name, "after_mib": len(held) * step_mib}
                os.close(sess)
                os.close(fd)
                break
            held.append((sess, fd))
            steps.append({"preserved_mib": len(held) * step_mib, "meminfo": meminfo()})
            print(json.dumps(steps[-1]), file=out_file, flush=True)
        out["at_the_end"] = meminfo()
    finally:
        for sess, fd in held:
            os.close(sess)  # an outgoing session closed: the kernel unpreserves its files
            os.close(fd)
        os.close(dev)
    out["after_closing"] = meminfo()
    return out


# ------------------------------------------------------------------------------ luosession

# PID 1 hands the session over as fd store entry ``labsess``.  In the first boot the session is
# outgoing: the service preserves a memfd with known bytes into it (token 1) and keeps running.
# After the kexec PID 1 hands back the incoming session under the same name: the service
# retrieves token 1, compares the bytes, finishes the session and writes the verdict to
# ``$LAB_RUN/luosession.verified``.  It runs next to the agent's participants to show that the
# two users of the single-open device coexist.
LUOSESSION_NAME = "labsess"
LUOSESSION_TOKEN = 1
LUOSESSION_PAYLOAD = hashlib.sha256(b"lab LUOSession").digest() * 4096  # 128 KiB


def _fd_named(name: str) -> int:
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    count = int(os.environ.get("LISTEN_FDS", "0"))
    for index in range(count):
        if index < len(names) and names[index] == name:
            return 3 + index
    raise SystemExit(f"lab-luosession: no fd named {name!r} in {names}")


def luosession() -> int:
    sys.path.insert(0, str(REPO))
    from luo_agent.kernel.syscalls import RealSyscalls
    from tests.kernel import luo_raw

    out = Path(os.environ["LAB_RUN"])
    sess = _fd_named(LUOSESSION_NAME)
    sc = RealSyscalls()
    try:
        got = luo_raw.retrieve_fd(sc, sess, LUOSESSION_TOKEN)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOENT):
            raise
        # Outgoing (first boot): preserve the payload, then hold on until the kexec.
        memfd = luo_raw.memfd(LUOSESSION_PAYLOAD, "lab-luosession")
        luo_raw.preserve_fd(sc, sess, memfd, LUOSESSION_TOKEN)
        (out / "luosession.preserved").write_text(f"{len(LUOSESSION_PAYLOAD)}\n")
        print(
            f"lab-mark: luosession-preserved {len(LUOSESSION_PAYLOAD)}", file=sys.stderr, flush=True
        )
        signal.pause()
        return 0
    ok = luo_raw.read_all(got) == LUOSESSION_PAYLOAD
    luo_raw.finish(sc, sess)
    (out / "luosession.verified").write_text("ok\n" if ok else "MISMATCH\n")
    print(f"lab-mark: luosession-verified {ok}", file=sys.stderr, flush=True)
    return 0 if ok else 1


# ------------------------------------------------------------------------------ the fleet's ids


def host_id() -> str:
    sys.path.insert(0, str(REPO))
    from luo_agent.fleet.identity import host_id_from_machine_id

    return host_id_from_machine_id()


def fleet_app_id() -> str:
    sys.path.insert(0, str(REPO))
    from luo_agent.fleet.identity import APP_ID

    return APP_ID.hex()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lab.in_vm")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("probe", help="retrieve and create each session name")
    p.add_argument("names", nargs="+")
    w = sub.add_parser("wait-ended", help="wait for an idle agent with a result")
    w.add_argument("--timeout", type=float, default=240.0)
    m = sub.add_parser("limit", help="memfds preserved until the kernel refuses")
    m.add_argument("step_mib", type=int)
    m.add_argument("steps_file")
    sub.add_parser("luosession", help="the LUOSession= service (its unit's ExecStart=)")
    sub.add_parser("host-id", help="the fleet's id of this machine")
    sub.add_parser("fleet-app-id", help="the application id the host id is derived with")
    args = parser.parse_args(argv)
    if args.command == "probe":
        print(json.dumps(probe(args.names)))
    elif args.command == "wait-ended":
        try:
            print(json.dumps(wait_ended(args.timeout)))
        except TimeoutError as exc:
            print(f"lab: {exc}", file=sys.stderr)
            return 1
    elif args.command == "limit":
        with open(args.steps_file, "a") as steps:
            print(json.dumps(limit(args.step_mib, steps)))
    elif args.command == "luosession":
        return luosession()
    elif args.command == "host-id":
        print(host_id())
    else:
        print(fleet_app_id())
    return 0


if __name__ == "__main__":
    sys.exit(main())
