"""webhook/memory.py: freed native memory goes back to the system (glibc only).

Each scenario runs in a fresh interpreter, so the allocator's state is its own, and
compares resident memory (VmRSS) before and after. A control run without the tuning shows
the scenario does hold memory on this allocator; where it does not, there is nothing to
prove and the test says so.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from tests.gunicorn_server import ROOT
from webhook import memory

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not sys.platform.startswith("linux") or memory._glibc() is None,
        reason="glibc's malloc only",
    ),
]

RSS = textwrap.dedent("""
    def rss_mib():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
""")

# A model swap in miniature: a large block freed (which, untuned, raises glibc's mmap
# threshold), then blocks of 1 MiB interleaved with small objects that stay, then the
# big blocks freed. Prints the MiB still resident over the baseline.
THRESHOLD_SCENARIO = RSS + textwrap.dedent("""
    import sys
    from webhook import memory
    if sys.argv[1] == "tuned":
        memory.tune_allocator()
    base = rss_mib()
    blob = bytearray(16 * 1024 * 1024); del blob
    big, small = [], []
    for i in range(150):
        big.append(bytearray(1024 * 1024))
        small.append(bytes(2000) + bytes([i % 256]))
    del big
    print(round(rss_mib() - base, 1))
""")

FRAGMENT_SCENARIO = RSS + textwrap.dedent("""
    import sys
    from webhook import memory
    chunks = [bytes(3000) + bytes([i % 256]) for i in range(60000)]
    kept = chunks[::20]
    del chunks
    before = rss_mib()
    if sys.argv[1] == "released":
        memory.release_free_memory()
    print(round(before - rss_mib(), 1))
""")


def _run(script: str, mode: str) -> float:
    out = subprocess.run(
        [sys.executable, "-c", script, mode],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    ).stdout
    return float(out.strip())


def test_freed_large_blocks_leave_the_process_when_the_allocator_is_tuned():
    untuned = _run(THRESHOLD_SCENARIO, "untuned")
    tuned = _run(THRESHOLD_SCENARIO, "tuned")
    if untuned < 100:
        pytest.skip(f"this allocator gives the blocks back by itself ({untuned} MiB held)")
    assert tuned < 20, f"tuned: {tuned} MiB still resident (untuned: {untuned} MiB)"


def test_release_free_memory_returns_fragmented_memory():
    kept_without = _run(FRAGMENT_SCENARIO, "kept")
    released = _run(FRAGMENT_SCENARIO, "released")
    assert released > 100, f"only {released} MiB returned (without the call: {kept_without})"
    assert kept_without < released
