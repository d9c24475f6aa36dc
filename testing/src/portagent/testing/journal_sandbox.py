"""A real systemd-journald in a private mount namespace, for the logging tests.

Run as `unshare --mount --propagation private python -m portagent.testing.journal_sandbox`:
it mounts fresh tmpfs over the journal's directories (so the machine's own journal,
if any, is neither seen nor touched), starts /lib/systemd/systemd-journald as a plain
process, prints "ready" and waits. Other processes join with `nsenter -t PID -m`.
Everything vanishes with the mount namespace when this process is killed.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

JOURNALD = Path("/lib/systemd/systemd-journald")
MOUNTS = [Path("/run/systemd/journal"), Path("/run/log"), Path("/var/log/journal")]


def main() -> int:
    for mount_point in MOUNTS:
        mount_point.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mount_point)], check=True)
    journald = subprocess.Popen(
        [str(JOURNALD)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    socket_path = MOUNTS[0] / "socket"
    deadline = time.monotonic() + 10
    while not socket_path.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if not socket_path.exists():
        journald.kill()
        print("journald did not start", flush=True)
        return 1
    print(f"ready {journald.pid}", flush=True)
    try:
        sys.stdin.read()  # until the test closes our stdin or kills us
    finally:
        journald.kill()
        journald.wait(5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
