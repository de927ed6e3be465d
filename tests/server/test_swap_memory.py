"""A swapped-out model's memory goes back to the OS (``server.models.release_free_heap``).

glibc keeps freed heap pages for reuse, so without a trim the server's RSS climbs
with every swap until the allocator's free lists are large enough (bench/serve.py's
swap-memory run measures it); the server trims after each swap.
"""

from __future__ import annotations

import platform
import sys
from pathlib import Path

import pytest

from server import models

glibc = pytest.mark.skipif(not sys.platform.startswith("linux")
                           or platform.libc_ver()[0] != "glibc", reason="glibc only")


def _rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@glibc
def test_release_free_heap_returns_freed_pages_glibc_would_keep() -> None:
    assert models._MALLOC_TRIM is not None
    # 64 MiB in 4 KiB blocks (malloc'd, under the mmap threshold); every 64th stays
    # alive, so the freed pages sit between live blocks and free() cannot return them
    blocks = [bytearray(4096) for _ in range(16384)]
    keep = blocks[::64]
    del blocks
    before = _rss_bytes()
    models.release_free_heap()
    after = _rss_bytes()
    assert before - after > 32 * 2**20, (before, after)
    assert len(keep) == 256
