"""Running a compiled entry: the full path, the quick path, and ahead of time.

Every call ends in `run_entry`, whichever way it came: a call on the full path (after
the signature is computed and the entry found), the quick path (`Quick`), or a program
compiled ahead of time (`CompiledCall`). The axis name, the check mode and the donation
checks travel with the entry.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.tree_util as jtu

from .. import _engine
from .._errors import differing_outputs
from .._jax_compat import Tracer
from .._keys import Guard
from .._layout import CheckMode, output_name
from .._program import Stale
from . import _memo
from ._inputs import CONCRETE, signature, where


class Entry(NamedTuple):
    """Everything a call of one signature needs."""

    compiled: _engine.Compiled
    dyn_index: tuple
    donated: tuple  # indices into the dynamic inputs
    put: bool  # whether some input must be moved to its layout first
    paths: tuple  # the key path of each dynamic input, for messages
    check: CheckMode  # the `check_replicated` mode
    axis_name: str  # the step's axis, for messages
    memo: _memo.Plan | None  # the modules among the outputs to remember
    structure: Any = None  # that of a call's inputs, to name `paths` (see `where`)

    def dyn_of(self, leaves: Sequence) -> Sequence:
        """The dynamic inputs among a call's flat leaves."""
        return [leaves[i] for i in self.dyn_index]


class Fast(NamedTuple):
    """A `pmap2` function's own shortcut to an entry, valid while its guards hold."""

    entry: Entry
    guards: tuple[Guard, ...]

    def valid(self) -> bool:
        for g in self.guards:
            if not g.holds():
                return False
        return True


def check_donation(dyn, donated, paths, structure=None) -> None:
    """`paths` of the inputs `dyn`, in a tree of `structure` (for messages)."""
    seen: dict = {}
    donated_set = set(donated)
    kept = {id(x): paths[j] for j, x in enumerate(dyn) if j not in donated_set}
    for d in donated:
        x = dyn[d]
        if isinstance(x, jax.Array) and not isinstance(x, Tracer):
            if x.is_deleted():
                raise ValueError(
                    f"The input {where(paths[d], structure)} was donated by an earlier "
                    "call and its buffer is gone. Pass the outputs of that call instead, "
                    "or use `donate='none'`."
                )
        if id(x) in seen:
            raise ValueError(
                f"The same array is passed twice, at {where(seen[id(x)], structure)} "
                f"and {where(paths[d], structure)}, and would be donated twice (tied "
                "weights?). Pass distinct arrays, or use `donate='none'`."
            )
        if id(x) in kept:
            raise ValueError(
                f"The same array is passed at {where(paths[d], structure)}, which is "
                f"donated, and at {where(kept[id(x)], structure)}, which is not: its "
                "buffer cannot be both given up and kept (a target network or an EMA "
                "that starts as the parameters?). Pass a copy for one of them "
                "(`jnp.copy`), or use `donate='none'`."
            )
        seen[id(x)] = paths[d]


class Lowered:
    """A `pmap2` function lowered for one call signature, from `Pmap2.lower`."""

    def __init__(self, lowered, entry: Entry, treedef, signature, tree):
        self.lowered = lowered  # the `jax.stages.Lowered` of the program
        self._entry, self._treedef, self._signature = entry, treedef, signature
        self._tree = tree  # `Pmap2._tree`: the tree of a call's inputs

    def as_text(self, *args, **kwargs) -> str:
        """The program's text (StableHLO by default), as `jax.stages.Lowered.as_text`."""
        return self.lowered.as_text(*args, **kwargs)

    def compile(self) -> CompiledCall:
        """Compiles it: a callable taking the same arguments as the `pmap2` function."""
        return CompiledCall(self.lowered.compile(), self)


class CompiledCall:
    def __init__(self, executable, lowered: Lowered):
        self.executable = executable  # the `jax.stages.Compiled`
        self._lowered = lowered

    def as_text(self) -> str:
        return self.executable.as_text()

    def __call__(self, *args, **kwargs):
        low = self._lowered
        tree = low._tree(args, kwargs)
        leaves, treedef = jtu.tree_flatten(tree)
        if treedef != low._treedef:
            raise TypeError(
                "The arguments do not match those this program was lowered for: their "
                f"tree structure differs ({_leaf_count(low._treedef, treedef)}). Lower "
                "it again for them."
            )
        sig = signature(leaves)
        if sig != low._signature:
            raise TypeError(_other_leaf(tree, low._signature, sig))
        return run_entry(
            low._entry, low._entry.dyn_of(leaves), self.executable, exact=True
        )


def _leaf_count(lowered, called) -> str:
    return (
        f"lowered for {lowered.num_leaves} leaves, called with {called.num_leaves}"
        if lowered.num_leaves != called.num_leaves
        else "the same number of leaves, in other containers"
    )


def _other_leaf(tree, lowered: tuple, called: tuple) -> str:
    """The message for a call of a `CompiledCall` whose leaf differs from the one the
    program was lowered for: the first such leaf, named, and both descriptions."""
    flat = jtu.tree_flatten_with_path(tree)[0]
    i = next(i for i, (a, b) in enumerate(zip(lowered, called)) if a != b)
    return (
        f"The argument {where(flat[i][0], tree)} does not match the one this program "
        f"was lowered for: it was {_shown(lowered[i])}, it is {_shown(called[i])}. "
        "Lower it again for these arguments."
    )


def _shown(sig) -> str:
    """A leaf's signature (see `_inputs.signature`) in words."""
    if isinstance(sig, tuple) and len(sig) == 2 and hasattr(sig[0], "str_short"):
        aval, sharding = sig
        return f"{aval.str_short()} laid out as {getattr(sharding, 'spec', sharding)}"
    if isinstance(sig, tuple) and len(sig) >= 2 and isinstance(sig[0], type):
        return f"the {sig[0].__name__} {sig[1]!r}"  # a static leaf (`plain_key`)
    if isinstance(sig, tuple) and len(sig) == 3 and sig[2] is None:
        return f"a NumPy array of shape {sig[0]} and dtype {sig[1]}"
    return str(sig)


def run_entry(entry: Entry, dyn: Sequence, program: Callable, exact: bool = False):
    """One call of a compiled entry on its dynamic inputs `dyn`, whichever way it was
    reached: the donation checks, `program` (the entry's jitted program, or an
    executable compiled ahead of time from its `exact_run`, which names every output's
    layout), the outputs' layouts (`Compiled.settle`, unless `exact`), the run-time
    replication check, and the outputs in their structure."""
    if entry.donated:
        check_donation(dyn, entry.donated, entry.paths, entry.structure)
    compiled = entry.compiled
    if entry.put:
        dyn = compiled.place(dyn, lambda i: where(entry.paths[i], entry.structure))
    outs = program(*compiled.const_values(), *dyn)
    return finish(entry, dyn, outs if exact else compiled.settle(outs))


def finish(entry: Entry, dyn: Sequence, outs: Sequence):
    """After the program: the run-time replication check, and the outputs in their
    structure."""
    compiled = entry.compiled
    if compiled.extra_out:
        *outs, flags = outs
        if entry.check == "runtime":
            bad = [
                output_name(p, compiled.treedef) for p in compiled.mismatched(flags)
            ]  # waits
            if bad:
                raise differing_outputs(bad, entry.axis_name)
    leaves = compiled.out_leaves(dyn, outs)
    tree = compiled.treedef.unflatten(leaves)
    _memo.remember(entry.memo, tree, leaves)
    return tree


MISS = object()  # `Quick` could not serve the call: take the full path
_sharding = operator.attrgetter("sharding")
STALE_LIMIT = (
    8  # `Quick` records of one structure replaced this often: stop making them
)


def _seen(guard: Guard) -> tuple[bool, Any]:
    """Whether the object a guard saw is still alive, and the object."""
    if guard.weak is None:
        return True, guard.seen
    obj = guard.weak()
    return obj is not None, obj


class Quick:
    """The steady-state call of one input structure: what the full path found for it
    last, with the arrays' checks left to `jax.jit`'s C++ dispatch.

    It is kept under the structure `_memo.flatten` gives the call's inputs (down to
    the modules an earlier call returned, which are single items there), and serves a
    call whose items are, at the same positions, remembered modules of the same
    structures (`_memo.expand` splices their leaves in), whose static leaves are the
    same objects, whose function reads the same globals and cells (the same objects),
    and whose array leaves are all concrete `jax.Array`s (no tracer, no host array).
    The layouts of the arrays are checked where `jax.jit` would not: those of a
    remembered module by the layout its record names (the program that returned it
    laid it out), the others one by one against the layouts the record was made with
    (`x.sharding`, about 0.1 us each): `jax.jit` takes an array laid out on a mesh of
    the same devices in another order, and moves it (then, on its next call with that
    layout, passes it to the program unmoved: the program crashes), and on a mesh of
    one device it takes a split array for a replicated one. Else it reads nothing of
    the arrays (reading an array's abstract value from Python costs a few hundred
    nanoseconds per array on a step's fresh outputs). The program was compiled with
    the input layouts fixed (`in_shardings`), and is called outside
    `tracing_allowed()`: an array of another shape, dtype or weak type makes `jax.jit`
    trace again, which raises `Stale`; one committed to another layout makes it raise
    `ValueError`; both before anything runs, and the call takes the full path, which
    reads and checks every input. Nothing it holds is a cache key: it is replaced by
    the full path's next call.
    """

    __slots__ = (
        "entry",
        "_known",
        "_statics_of",
        "_statics",
        "_dyn_of",
        "_dicts",
        "_cells",
        "_laid_of",
        "_laid",
    )

    def __init__(
        self, entry: Entry, known, statics_of, statics, dicts, cells, laid_of, laid
    ):
        self.entry = entry
        self._known = known  # `_memo.known_at` of the items it was made from
        self._dyn_of = _engine.getter(entry.dyn_index)
        self._statics_of, self._statics = statics_of, statics
        self._dicts, self._cells = dicts, cells
        # The arrays not in a remembered module, and the shardings they had.
        self._laid_of, self._laid = laid_of, laid

    def __call__(self, items: Sequence):
        leaves = _memo.expand(items, self._known) if self._known else items
        if leaves is None or not self._same_statics(leaves):
            return MISS
        dyn = self._dyn_of(leaves)
        if not set(map(type, dyn)) <= CONCRETE:
            return MISS
        if tuple(map(_sharding, self._laid_of(leaves))) != self._laid:
            return MISS  # (compared object by object first, then by value)
        entry = self.entry
        if entry.donated:
            check_donation(dyn, entry.donated, entry.paths, entry.structure)
        compiled = entry.compiled
        try:
            outs = compiled.run(*compiled.const_values(), *dyn)
        except (Stale, ValueError):  # raised before anything ran
            return MISS
        return finish(entry, dyn, outs)

    def _same_statics(self, leaves: Sequence) -> bool:
        """Whether the static leaves, and the globals and cells the function reads,
        are the objects they were."""
        if not all(map(operator.is_, self._statics_of(leaves), self._statics)):
            return False
        for get, namespace, seen in self._dicts:
            try:
                now = get(namespace)
            except KeyError:
                return False
            if not all(map(operator.is_, now, seen)):
                return False
        for cell, seen in self._cells:
            try:
                if cell.cell_contents is not seen:
                    return False
            except ValueError:  # emptied
                return False
        return True


def make_quick(
    entry: Entry, items: Sequence, leaves: Sequence, guards: Sequence[Guard]
) -> Quick | None:
    """A `Quick` record for `entry` as the full path just called it with `leaves`
    (`items` as `_memo.flatten` gave them), or None when such a call cannot be served
    that way (host inputs to place, a tracer, a constant that is a tracer, a guarded
    object that has died)."""
    compiled = entry.compiled
    if entry.put or compiled.in_shardings is None:
        return None  # inputs to place; or an ensemble's program, whose are not fixed
    if any(isinstance(c(), Tracer) for c in compiled.consts):
        return None
    if not {type(leaves[i]) for i in entry.dyn_index} <= CONCRETE:
        return None
    dyn = set(entry.dyn_index)
    static_at = [i for i in range(len(leaves)) if i not in dyn]
    statics = tuple(leaves[i] for i in static_at)
    dicts: dict[int, tuple[dict, list, list]] = {}
    cells = []
    for g in guards:
        alive, obj = _seen(g)
        if not alive:
            return None
        if g.name is None:
            cells.append((g.container, obj))
        else:
            _, names, seen = dicts.setdefault(id(g.container), (g.container, [], []))
            names.append(g.name)
            seen.append(obj)
    checks = tuple(
        (_engine.getter(names), namespace, tuple(seen))
        for namespace, names, seen in dicts.values()
    )
    known = _memo.known_at(items)
    spliced = _memo.expand(items, known)
    if spliced is None or len(spliced) != len(leaves):
        return None
    if not all(map(operator.is_, spliced, leaves)):
        return None  # (a module remembered since the call began)
    width = {i: treedef.num_leaves for i, treedef, _ in known}
    in_module: set[int] = set()  # the leaves of the remembered modules
    start = 0
    for i in range(len(items)):
        n = width.get(i, 1)
        if i in width:
            in_module.update(range(start, start + n))
        start += n
    laid_at = [i for i in entry.dyn_index if i not in in_module]
    laid = tuple(leaves[i].sharding for i in laid_at)
    return Quick(
        entry,
        known,
        _engine.getter(static_at),
        statics,
        checks,
        tuple(cells),
        _engine.getter(laid_at),
        laid,
    )
