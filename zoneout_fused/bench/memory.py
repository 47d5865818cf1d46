"""Peak memory of one call, on CUDA and on CPU.

CUDA: torch.cuda.max_memory_allocated after resetting the peak, minus what was allocated
before the call (so weights and inputs do not count).

CPU: tracemalloc does not see torch's allocations and torch keeps no CPU allocator statistics,
so we read the process's resident set: reset the kernel's high-water mark (VmHWM) by writing 5
to /proc/self/clear_refs, return freed heap pages to the OS with malloc_trim, and report
VmHWM minus the RSS just before the call. Without malloc_trim, blocks freed by an earlier call
stay resident and are reused without raising the peak, and the figure would read near 0; for the
same reason the cpu backend's kept buffers (zoneout_fused.cpu_isa.empty_cache) are freed first. It
counts touched pages (allocator slack and oneDNN/OpenMP workspaces included), so it is an upper
bound of the tensors' peak, to compare backends with, not to add up. Without a writable
/proc/self/clear_refs (not Linux, or a locked-down container) it is None and the reason is given.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import gc
from typing import Callable, Optional

import torch

_MB = 2.0**20


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # the kernel reports kB
    raise KeyError(key)


def _empty_cpu_backend_cache() -> None:
    from .. import cpu_isa, ops

    if ops._EXTENSION_ERRORS.get("cpu") == "":  # the extension is loaded (and may hold buffers)
        cpu_isa.empty_cache()


def _libc_function(name: str):
    """The C library's function `name` through ctypes, or None where there is no such function."""
    libc_name = ctypes.util.find_library("c")
    try:
        return getattr(ctypes.CDLL(libc_name), name) if libc_name else None
    except (OSError, AttributeError):
        return None


# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_PINNED_THRESHOLD = 1 << 30


def pin_heap_thresholds() -> str:
    """Fixes glibc's heap thresholds for the rest of the process and says what it did.

    Why: glibc moves its mmap threshold with the process's history (each freed mmapped block
    raises it), so whether a call's large temporaries come from fresh pages, faulted in again on
    every call, depended on what ran before. nn.LSTM's oneDNN workspace is such a block: B=32
    T=100 I=64 H=256 forward, 4043 page faults and 11.6 ms a call in one process, 0 faults and
    6.4 ms in another. With the thresholds pinned, blocks up to 1 GiB come from the heap and
    freed memory stays there for the next call, in every process: each peer's steady state (the
    strict comparison for ours, whose buffers are pooled anyway)."""
    mallopt = _libc_function("mallopt")
    if mallopt is None:
        return "default (no glibc mallopt here)"
    if not (mallopt(_M_MMAP_THRESHOLD, _PINNED_THRESHOLD) and mallopt(_M_TRIM_THRESHOLD, _PINNED_THRESHOLD)):
        return "default (glibc mallopt refused the thresholds)"
    return "glibc mmap and trim thresholds pinned at 1 GiB"


class PeakMemory:
    """measure(fn) -> peak MB above the pre-call level, or None (see `method` for why)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._malloc_trim = None
        if device.type == "cuda":
            self.method = "torch.cuda.max_memory_allocated after reset, minus memory allocated before the call"
            return
        try:
            self._reset_high_water_mark()
            _status_bytes("VmHWM")
        except OSError as error:  # also FileNotFoundError, PermissionError
            self.method = f"None: cannot reset the RSS high-water mark via /proc/self/clear_refs ({error})"
            return
        self._malloc_trim = _libc_function("malloc_trim")
        self.method = ("peak RSS (VmHWM, reset via /proc/self/clear_refs) minus RSS before the call"
                       + (", after malloc_trim" if self._malloc_trim else ", no malloc_trim (may under-read)"))

    @property
    def available(self) -> bool:
        return not self.method.startswith("None")

    @staticmethod
    def _reset_high_water_mark() -> None:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")

    def measure(self, fn: Callable[[], object]) -> Optional[float]:
        if not self.available:
            return None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            fn()
            torch.cuda.synchronize(self.device)
            return (torch.cuda.max_memory_allocated(self.device) - before) / _MB
        _empty_cpu_backend_cache()
        if self._malloc_trim is not None:
            self._malloc_trim(0)
        self._reset_high_water_mark()
        before = _status_bytes("VmRSS")
        fn()
        return max(_status_bytes("VmHWM") - before, 0) / _MB
