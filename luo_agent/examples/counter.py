"""The smallest complete participant (docs/participants.md): a counter in a memfd that survives
live updates.  units/luo-example-counter.service runs it (Type=notify, before the restore gate)."""

import asyncio
import os

from luo_agent.participant import Participant, notify


async def main() -> None:
    async with await Participant.connect("counter") as lu:
        fd = await lu.memfd(1, size=8)  # the carried memfd after a live update, else a new one
        count = int.from_bytes(os.pread(fd, 8, 0), "little")
        after = f" after live update {lu.update_id}" if lu.live_update_boot else ""
        print(f"counter: starting at {count}{after}", flush=True)
        notify("READY=1")  # the restore gate waits for this
        while True:
            count += 1
            os.pwrite(fd, count.to_bytes(8, "little"), 0)
            await asyncio.sleep(0.1)


if __name__ == "__main__":
    asyncio.run(main())
