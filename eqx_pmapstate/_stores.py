"""The registry of the library's stores: every memo, table or cache that
`eqx_pmapstate.clear_caches()` (and `jax.clear_caches()`) must empty.

A store registers a callable that empties it. `_cache.ProgramCache.cache_clear`, which
both of those call, calls each one. The stores are the compiled programs (`_cache`),
each `pmap2` function's fast path and compile log (listeners of `_cache`), the meshes
(`_mesh`), `Map`'s `pmap2` functions (`_map`), what a code object reads and assigns
(`_keys`), the array types seen (`_pmap2`) and the leaves of the modules `pmap2`
returned (`_pmap2._memo`). Not a store: `_registry`, which records
the batch axis of live arrays made on one device (a fact about each array, held weakly
and dropped with it; clearing it would lose their layout).
"""

from __future__ import annotations

import threading
from collections.abc import Callable


_lock = threading.Lock()
_stores: dict[str, Callable[[], object]] = {}


def register_store(what: str, clear: Callable[[], object]) -> None:
    """Registers `clear`, which empties the store named `what`."""
    with _lock:
        _stores[what] = clear


def clear_stores() -> None:
    """Empties every registered store."""
    with _lock:
        clears = list(_stores.values())
    for clear in clears:
        clear()


def store_names() -> list[str]:
    with _lock:
        return sorted(_stores)
