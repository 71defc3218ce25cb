"""The library's one cache of compiled programs: bounded, and cleared with JAX's."""

from __future__ import annotations

import threading
import weakref
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, NamedTuple

from ._jax_compat import register_with_jax_clear_caches
from ._keys import WeakId
from ._stores import clear_stores


MAXSIZE = 256


class CacheInfo(NamedTuple):
    hits: int
    misses: int
    maxsize: int
    currsize: int


class ProgramCache:
    """A least-recently-used map from keys to compiled programs.

    An entry whose key holds an array by weak reference (`WeakId`) is dropped once that
    array is gone: it could never be hit again, and dropping it frees the program.
    Holders of per-function fast paths (each `pmap2` function) listen: clearing this
    cache clears them (`clear_fast_path()`), and an entry evicted or dropped here is
    forgotten there too (`forget(values)`), so that no fast path outlives the entries
    it points to.
    """

    def __init__(self, maxsize: int = MAXSIZE):
        self.maxsize = maxsize
        self._entries: OrderedDict = OrderedDict()
        self._weak: dict = {}  # key -> its WeakIds
        self._lock = threading.RLock()
        self._hits = self._misses = 0
        self._listeners: weakref.WeakSet = weakref.WeakSet()

    def get(self, key) -> Any:
        with self._lock:
            value = self._entries.get(key)
            if value is None:
                self._misses += 1
                return None
            self._entries.move_to_end(key)
            self._hits += 1
            return value

    def put(self, key, value, weak: Sequence[WeakId] = ()) -> None:
        with self._lock:
            gone = self._drop_dead()
            self._entries[key] = value
            self._entries.move_to_end(key)
            if weak:
                self._weak[key] = tuple(weak)
            while len(self._entries) > self.maxsize:
                old, old_value = self._entries.popitem(last=False)
                self._weak.pop(old, None)
                gone.append(old_value)
            listeners = list(self._listeners) if gone else []
        for obj in listeners:
            obj.forget(gone)

    def _drop_dead(self) -> list:
        """Drops the entries keyed on an array that is gone; returns their values."""
        dead = [k for k, ws in self._weak.items() if not all(w.alive for w in ws)]
        gone = []
        for k in dead:
            gone.append(self._entries.pop(k, None))
            del self._weak[k]
        return gone

    def listen(self, obj) -> None:
        """`obj.clear_fast_path()` is called whenever this cache is cleared, and
        `obj.forget(values)` with the values of entries evicted or dropped."""
        self._listeners.add(obj)

    # The interface `functools.lru_cache` has, which `jax.clear_caches()` uses.

    def cache_clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._weak.clear()
            self._hits = self._misses = 0
            listeners = list(self._listeners)
        for obj in listeners:
            obj.clear_fast_path()
        clear_stores()

    def cache_info(self) -> CacheInfo:
        with self._lock:
            self._drop_dead()  # (their fast paths go when the next entry is put)
            return CacheInfo(self._hits, self._misses, self.maxsize, len(self._entries))

    def cache_keys(self) -> list:
        with self._lock:
            return list(self._entries)


programs = ProgramCache()
register_with_jax_clear_caches(programs, "eqx_pmapstate compiled programs")


def clear_caches() -> None:
    """Drops every program this library compiled and cached, and empties its other
    stores: each `pmap2` function's shortcuts and compile log, the meshes it made,
    `Map`'s functions, what it memoised about code objects, and the leaves of the
    modules its functions returned.

    `jax.clear_caches()` does the same (and clears JAX's own caches). Programs are
    otherwise kept until their least recent use is among the oldest of
    `eqx_pmapstate._cache.MAXSIZE` entries, or until an array they were keyed on is gone.

    **Returns:**

    Nothing.
    """
    programs.cache_clear()
