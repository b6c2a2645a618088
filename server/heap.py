"""Keep full garbage collections short, and give freed memory back to the OS.

A loaded model leaves hundreds of thousands of long-lived Python objects (modules, parameters, tokenizer
tables). Every full collection of the cyclic garbage collector walks all of them, and stalls every thread while
it does, the scheduler's included: 60-300 ms per collection with one tiny model loaded, which showed as the p99
of request latency. Freezing the objects that exist once a model has loaded moves them out of the collector's
sight. Before a freeze, everything is unfrozen and collected, so the cycles of a terminated or failed model are
freed rather than kept forever.

glibc's malloc keeps what a terminated model and the activations of large generations freed inside its heaps,
and hands little of it back: in the soak (benchmarks/README.md) RSS after each terminate sat at 900-950 MiB against
554 MiB at start, drifting with each cycle, though no Python object was left over. `malloc_trim(0)` returns those
pages: 677-705 MiB over 22 cycles (MALLOC_ARENA_MAX=2 did not help). It costs 10-50 ms once per load or
terminate. Where the C library has no malloc_trim (musl, macOS), nothing is trimmed.
"""

import ctypes
import ctypes.util
import gc


def _malloc_trim():
    """glibc's malloc_trim, or None where the C library lacks it."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim", None)
    except OSError:
        return None


_MALLOC_TRIM = _malloc_trim()


def settle() -> None:
    """Collect all garbage, freeze what is left, and return freed heap memory to the OS; call after a model has
    loaded or been dropped."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)
