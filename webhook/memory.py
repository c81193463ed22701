"""Native memory: keep glibc's allocator from holding on to memory the service freed.

A worker's Python objects stay flat under steady traffic, but its resident size kept
rising (bench/soak.py; figures in bench/README.md), all of it in glibc's per-thread malloc
arenas (found by diffing /proc/<pid>/smaps). Two glibc behaviours cause it:

- The mmap threshold is dynamic: freeing a large block that was mmap()ed (a model blob,
  a numpy array of a few MiB) raises the threshold to its size, so later blocks of that
  size come from the arenas instead, where they fragment and are never given back.
- Free memory in the middle of an arena is only returned to the system by malloc_trim().

``tune_allocator`` fixes the threshold at glibc's default (which also stops the dynamic
adjustment) and caps the arenas at two; ``release_free_memory`` runs malloc_trim, which
the engine's thread calls after each periodic check. Settings given in the environment
(``MALLOC_MMAP_THRESHOLD_``, ``MALLOC_ARENA_MAX``) win. Elsewhere than glibc both do
nothing.
"""

from __future__ import annotations

import ctypes
import logging
import os

log = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
MMAP_THRESHOLD = 128 * 1024  # glibc's default, now fixed
ARENA_MAX = 2

_libc = None


def _glibc():
    global _libc
    if _libc is None:
        try:
            libc = ctypes.CDLL(None)
            _libc = libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else False
        except OSError:
            _libc = False
    return _libc or None


def tune_allocator() -> bool:
    """Fix the mmap threshold and cap the arenas (once per process is enough; repeating
    it is harmless). Returns whether glibc is there to tune."""
    libc = _glibc()
    if libc is None:
        return False
    if "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)
    if "MALLOC_ARENA_MAX" not in os.environ:
        libc.mallopt(M_ARENA_MAX, ARENA_MAX)
    return True


def release_free_memory() -> None:
    """Give the free memory inside malloc's arenas back to the system."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
