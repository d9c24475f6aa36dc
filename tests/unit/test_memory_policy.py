"""The agent's malloc policy (engine.pin_mmap_threshold): after one large transient
buffer (a 20 MB snapshot message), later large buffers still go back to the OS when
freed. Each case runs in a fresh interpreter: the policy is process-wide."""

from __future__ import annotations

import subprocess
import sys

import pytest

# A 20 MB block freed, then 100 buffers of 200 KB filled and freed: how much of the
# second lot the process still holds (MB of RSS above where it started).
_PROGRAM = """
import sys
from portagent.agent.engine import pin_mmap_threshold

def rss_mb():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

if sys.argv[1] == "pin" and not pin_mmap_threshold():
    sys.exit("mallopt refused")
message = bytes(20 * 1024 * 1024)
del message
before = rss_mb()
buffers = [bytearray(b"x" * 200_000) for _ in range(100)]
del buffers
print(rss_mb() - before)
"""


def _held_mb(mode: str) -> float:
    done = subprocess.run(
        [sys.executable, "-c", _PROGRAM, mode],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return float(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_large_buffers_go_back_to_the_os_after_a_larger_one_was_freed() -> None:
    # glibc's default raises its mmap threshold to the 20 MB block freed: the 200 KB
    # buffers then come from the heap and stay held. Pinned, they are each mmapped and
    # unmapped when freed.
    assert _held_mb("default") > 10
    assert _held_mb("pin") < 5
