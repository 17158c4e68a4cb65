"""The process's allocator state: ``steady`` (glibc keeps the memory it frees) or ``default``.

    detail = set_allocator("steady")   # process-wide, never undone; returns what was done

``steady`` sets glibc's ``mallopt(M_MMAP_MAX, 0)`` (no chunk is served by its own mmap) and
``M_TRIM_THRESHOLD`` to 2^31 - 1, the most it takes (a free top of the heap is handed back only over
2 GiB), so memory freed by one step is reused by the next without page faults. Two users:

- latency lookups (``students.cost.lookup``): a forward's large activations would otherwise go back to
  the kernel and come back as fresh zeroed pages in the next forward, a cost that depends on the
  process's history rather than on the UNet (610,000 faults and 1.1 s of system time per 3.6 s
  forward on the snapfusion preset at 256 px);
- Beam jobs that move large elements (the curate job's Arrow tables): a runner copies each encoded
  element several times per stage boundary, into buffers of tens of MB that glibc mmaps fresh
  every time; steady halves the cost of a boundary (BENCHMARKS.md, curation throughput).

The price: the process keeps its peak heap (each thread's malloc arena its own) until it exits; a
worker that runs several threads beside a large model holds more than it would otherwise. ``default`` leaves the allocator as the
process has it (and reports the steady state if something set it before). Without glibc, ``steady``
falls back to the default and says so in the detail.
"""

from __future__ import annotations

ALLOCATORS = ("steady", "default")
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's mallopt parameters (malloc.h)
_STEADY: list[str] = []  # the detail of the steady state once set (it is process-wide and stays)


def set_allocator(state: str) -> str:
    """Put the process's allocator in ``state`` (one of ``ALLOCATORS``); returns what was done."""
    if state not in ALLOCATORS:
        raise ValueError(f"allocator {state!r} is not one of {', '.join(ALLOCATORS)}")
    if state == "default":
        return _STEADY[0] if _STEADY else "default"
    if not _STEADY:
        import ctypes
        import platform

        if platform.libc_ver()[0] != "glibc":
            _STEADY.append(f"default (steady needs glibc; this is {platform.system()} "
                           f"{platform.libc_ver()[0] or 'without glibc'})")
        else:
            libc = ctypes.CDLL(None)
            trim = 2**31 - 1
            if libc.mallopt(M_MMAP_MAX, 0) != 1 or libc.mallopt(M_TRIM_THRESHOLD, trim) != 1:
                raise RuntimeError("mallopt refused the steady allocator settings")
            _STEADY.append(f"steady: glibc {platform.libc_ver()[1]} mallopt M_MMAP_MAX=0 M_TRIM_THRESHOLD={trim}")
    return _STEADY[0]
