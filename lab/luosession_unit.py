"""A service with a LUO session of its own through systemd 262's ``LUOSession=`` (in the lab VM).

PID 1 hands the session over as fd store entry ``labsess``.  In the first boot the session is
outgoing: the service preserves a memfd with known bytes into it (token 1) and keeps running.
After the kexec PID 1 hands back the incoming session under the same name: the service retrieves
token 1, compares the bytes, finishes the session and writes the verdict to
``$LAB_RUN/luosession.verified``.  It runs next to the agent's participants to show that the two
users of the single-open device coexist.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import sys
from pathlib import Path

from luo_agent.kernel.syscalls import RealSyscalls
from tests.kernel import luo_raw

NAME = "labsess"
TOKEN = 1
PAYLOAD = hashlib.sha256(b"lab LUOSession").digest() * 4096  # 128 KiB


def _fd_named(name: str) -> int:
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    count = int(os.environ.get("LISTEN_FDS", "0"))
    for index in range(count):
        if index < len(names) and names[index] == name:
            return 3 + index
    raise SystemExit(f"lab-luosession: no fd named {name!r} in {names}")


def main() -> int:
    out = Path(os.environ["LAB_RUN"])
    sess = _fd_named(NAME)
    sc = RealSyscalls()
    try:
        got = luo_raw.retrieve_fd(sc, sess, TOKEN)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOENT):
            raise
        # Outgoing (first boot): preserve the payload, then hold on until the kexec.
        memfd = luo_raw.memfd(PAYLOAD, "lab-luosession")
        luo_raw.preserve_fd(sc, sess, memfd, TOKEN)
        (out / "luosession.preserved").write_text(f"{len(PAYLOAD)}\n")
        print(f"lab-mark: luosession-preserved {len(PAYLOAD)}", file=sys.stderr, flush=True)
        signal.pause()
        return 0
    ok = luo_raw.read_all(got) == PAYLOAD
    luo_raw.finish(sc, sess)
    (out / "luosession.verified").write_text("ok\n" if ok else "MISMATCH\n")
    print(f"lab-mark: luosession-verified {ok}", file=sys.stderr, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
