"""Keep full garbage collections short.

A loaded model leaves hundreds of thousands of long-lived Python objects (modules, parameters, tokenizer
tables). Every full collection of the cyclic garbage collector walks all of them, and stalls every thread while
it does, the scheduler's included: 60-300 ms per collection with one tiny model loaded, which showed as the p99
of request latency. Freezing the objects that exist once a model has loaded moves them out of the collector's
sight. Before a freeze, everything is unfrozen and collected, so the cycles of a terminated or failed model are
freed rather than kept forever.
"""

import gc


def settle() -> None:
    """Collect all garbage, then freeze what is left; call after a model has loaded or been dropped."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()
