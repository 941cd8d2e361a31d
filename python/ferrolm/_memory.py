"""Peak resident memory of a block of code, for the fine-tuning comparison and benchmarks."""

from __future__ import annotations

import re
from typing import Optional

__all__ = ["PeakMemory"]


def _status_kb(field: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    if m is None:
        raise OSError(f"/proc/self/status has no {field}")
    return int(m.group(1))


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _mallopt(option: int, value: int) -> None:
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").mallopt(option, value)
    except (OSError, AttributeError):
        pass


def _release_free_memory() -> None:
    """Collects garbage and hands the C heap's free pages back to the kernel (glibc's
    ``malloc_trim``), so that memory freed before a measurement is not silently reused inside
    it, which would hide part of the block's peak."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """``with PeakMemory() as m: ...`` then ``m.peak_bytes``: how far this process's resident
    memory rose above its level at entry, at its highest inside the block (gradients,
    optimizer state, activations, allocator slack: what a user sees in ``top``).

    Linux only: the kernel's high-water mark is reset on entry by writing ``5`` to
    ``/proc/self/clear_refs`` and read back from ``VmHWM``. Elsewhere ``peak_bytes`` is None.
    Inside the block glibc serves every allocation of 128 KiB or more with its own mapping
    (``mallopt(M_MMAP_THRESHOLD)``), so a freed tensor leaves the resident set at once instead
    of being recycled from the heap, which would hide a peak; on exit the threshold goes to
    32 MiB, where glibc's own adaptive threshold ends up in a long-running process.
    """

    def __init__(self) -> None:
        self.peak_bytes: Optional[int] = None
        self._start: Optional[int] = None

    def __enter__(self) -> "PeakMemory":
        _mallopt(_M_MMAP_THRESHOLD, 128 * 1024)
        _release_free_memory()
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
                f.write("5")
            self._start = _status_kb("VmRSS")
        except OSError:
            self._start = None
        return self

    def __exit__(self, *exc) -> None:
        _mallopt(_M_MMAP_THRESHOLD, 32 * 1024 * 1024)
        _mallopt(_M_TRIM_THRESHOLD, 64 * 1024 * 1024)
        if self._start is not None:
            try:
                self.peak_bytes = max(0, _status_kb("VmHWM") - self._start) * 1024
            except OSError:
                self.peak_bytes = None
