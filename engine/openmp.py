"""Give back a thread's OpenMP workers when it stops doing torch work, so an idle model costs its neighbours nothing.

PyTorch's CPU wheels run intra-op parallelism on GNU OpenMP (libgomp). libgomp gives every thread that starts a
parallel region a pool of its own `threads - 1` workers, kept for the thread's lifetime, and it counts all of them
process-wide: once there are more than the machine's CPUs, every worker of every pool stops spin-waiting between
parallel regions (about 100 spins instead of 300 000) and sleeps, to be woken by a futex at the next region. A tiny
model runs hundreds of short parallel regions per forward, so that wake-up is the cost of each: with 2 threads on
2 cores an SD1.5 lane fell from ~80 to ~42 images/s the moment one more pool existed. One extra pool was all it
took: the thread that loaded a model whose text encoder is quantized (the bitsandbytes probe forward runs parallel
regions) stayed alive in the server's thread pool with its workers, so an idle FLUX.1-schnell or sd3-medium halved
its neighbours. A scheduler thread that served a burst and went idle held its pool the same way.

`release_thread_pool()` frees the calling thread's pool (OpenMP 5.0 `omp_pause_resource` on the host device, which
libgomp implements per thread); the next parallel region on that thread builds a new one in microseconds. The
engine calls it after a load and when a runner's queue has been empty for a while. Where torch uses another
OpenMP runtime, or none, it does nothing.
"""

from __future__ import annotations

import ctypes
import functools

OMP_PAUSE_SOFT = 1  # omp_pause_soft: free the threads, keep nothing that a later region cannot rebuild


@functools.cache
def _libgomp() -> ctypes.CDLL | None:
    """The libgomp this process has loaded (torch's, whatever its file name), or None."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            paths = {line.split()[-1] for line in maps if "libgomp" in line}
    except OSError:
        return None
    for path in sorted(paths):
        try:
            library = ctypes.CDLL(path)  # already loaded: this only looks the handle up
            library.omp_pause_resource.argtypes = (ctypes.c_int, ctypes.c_int)
            library.omp_get_initial_device.restype = ctypes.c_int
            return library
        except (OSError, AttributeError):
            continue
    return None


def release_thread_pool() -> bool:
    """Free the calling thread's OpenMP workers; True when a libgomp pool was released (or there was none)."""
    library = _libgomp()
    if library is None:
        return False
    return library.omp_pause_resource(OMP_PAUSE_SOFT, library.omp_get_initial_device()) == 0
