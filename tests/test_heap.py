"""adapters/heap.py: free C-heap pages go back to the system (glibc's malloc_trim)."""

from __future__ import annotations

import subprocess
import sys

PROBE = r"""
import sys
from gatewayd.adapters.heap import release_free_memory

def rss_kb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS:")).split()[1])

# 80 MB in 4 KiB blocks from malloc's heap (above pymalloc's 512 bytes, below the mmap threshold); every 16th
# is kept, so the heap's top never shrinks by itself and the freed pages stay resident until trimmed
blocks = [bytes(4096) for _ in range(20000)]
kept = blocks[::16]
del blocks
before = rss_kb()
assert release_free_memory()
after = rss_kb()
print(before, after, len(kept))
"""


def test_free_heap_pages_are_handed_back() -> None:
    out = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60
    )
    before, after, _ = (int(x) for x in out.stdout.split())
    assert before - after > 50_000, f"RSS {before} kB before the trim, {after} kB after: nothing handed back"
