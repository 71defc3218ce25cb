"""The engine shared by `pmap2_new_states`, `vmap2_new_states`, `pmap2` and `Map`.

A per-device function is run over one named axis: a mesh axis through
`jax.jit(jax.shard_map(...))`, or a batch axis through `jax.jit(jax.vmap(...))`. Where each
output goes (which axis, or replicated, or handed back as the very input it is) is only
known once the function has been traced, so the engine works in two steps, both done once
per call signature and cached:

1. abstract traces (`jax.eval_shape`: nothing is compiled or run) with `check_vma=True`,
   which tell for each output whether it varies over the axis. For `pmap2` there are two:
   one with the replicated inputs invariant, one with them as per-device copies, the
   semantics of the real program. A `decide` callback, given every output leaf with its
   path and these findings, picks its layout. Where JAX cannot type a body (a collective
   over a `vmap` axis inside it), one untyped trace stands in and nothing is assumed;
2. the real program, `shard_map` with `check_vma=False` (`jax.pmap`'s semantics: a
   replicated input acts as an identical copy on each device), whose `out_specs` are the
   decisions of step 1. Outputs that must be replicated but that the trace could not prove
   identical are checked at run time: two hashes per leaf, compared across the axis with a
   single `pmax`.
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import functools
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from ._mesh import axis_spec
from ._tree import is_arraylike, keystr, paths_str


class ReplicationError(ValueError):
    """A leaf that should be the same on every device is not."""


class _HideReplicationErrors(logging.Filter):
    # Each device raises the same ReplicationError in its own callback; JAX logs every
    # one with a traceback before the run fails with a single JaxRuntimeError. Keep the
    # error, drop the eight log entries.
    def filter(self, record):
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, ReplicationError)


logging.getLogger("jax._src.callback").addFilter(_HideReplicationErrors())


@atexit.register
def _forget_failed_checks():
    # A failed run-time check leaves JAX's runtime tokens holding the error, which JAX's
    # own exit handler would raise again (and print) at interpreter exit, after the user
    # has already seen and handled it. Registered after JAX's handler, this runs first.
    try:
        from jax._src import dispatch

        dispatch.runtime_tokens.block_until_ready()
    except Exception as e:
        if "ReplicationError" in str(e):
            dispatch.runtime_tokens.clear()


def replication_message(paths, axis_name) -> str:
    return (
        f"The leaf/leaves at {paths_str(paths)} should be the same on every device of the "
        f"axis {axis_name!r} (replicated), but differ between devices. If they are parameters "
        "updated from gradients, average the gradients first with "
        f"`jax.lax.pmean(grads, {axis_name!r})`; if they are meant to differ, return them "
        "with a device axis (`out_axes=0`)."
    )


class LeafInfo(NamedTuple):
    """What `decide` learns about one output leaf during the abstract trace."""

    path: tuple
    leaf: Any  # a tracer (per-device view), or a non-array Python object
    input_index: int | None  # the input this leaf is the very same object as, if any
    varying: bool | None  # varies over the axis (None: not known, the vmap backend)
    # With `pvary_inputs`: whether it still varies when replicated inputs are taken as
    # invariant, that is, whether it depends on mapped inputs or `axis_index` by more than
    # a reduction. (Gradients with respect to invariant inputs are summed over the axis
    # by JAX in that trace, so "not varying" here does not prove a leaf replicated under
    # `jax.pmap`'s semantics: such leaves are checked at run time.)
    varying_alone: bool | None = None


class Pass(NamedTuple):
    """A decision: hand back input number `index` unchanged."""

    index: int


@dataclasses.dataclass(frozen=True)
class Plan:
    treedef: Any
    kinds: (
        tuple  # per flat output leaf: ("array", axis) | ("pass", j) | ("static", obj)
    )
    array_paths: tuple  # paths of the "array" leaves, in order
    checked: tuple  # indices into the "array" leaves that need the run-time check


class Decided(NamedTuple):
    """`decide`'s answer: one entry per output leaf, and which replicated leaves to check."""

    decisions: Sequence  # int | None | Pass, per leaf; ignored for non-array leaves
    check: frozenset = (
        frozenset()
    )  # flat indices of replicated leaves to check at run time


_cache: dict = {}
_lock = threading.RLock()


def _abstract(x):
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, x.dtype)
    return jax.ShapeDtypeStruct(
        np.shape(x), jnp.result_type(x), weak_type=getattr(x, "weak_type", False)
    )


def aval_key(x):
    return (np.shape(x), jnp.result_type(x), getattr(x, "weak_type", False))


def _words(x):
    """The bits of `x` as a flat uint32 vector."""
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([x.real, x.imag])
    if x.dtype == jnp.bool_:
        x = x.astype(jnp.uint8)
    size = x.dtype.itemsize
    bits = jax.lax.bitcast_convert_type(
        x, {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[size]
    )
    if size == 8:
        bits = jax.lax.bitcast_convert_type(bits, jnp.uint32)
    return bits.astype(jnp.uint32).ravel()


def _mix(h):
    # The finaliser of MurmurHash3: every input bit affects every output bit.
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _hash_words(w, pos):
    # Two independent hashes of each word, mixed with its position, so that differences
    # in several words do not cancel out in the sum the way they can in a weighted sum.
    a = _mix(w ^ _mix(pos + jnp.uint32(0x9E3779B9)))
    b = _mix(
        (w + jnp.uint32(0x7F4A7C15))
        ^ _mix(pos * jnp.uint32(0x27D4EB2F) + jnp.uint32(1))
    )
    return jnp.stack([a, b], axis=-1)


_SMALL = 1 << 16  # arrays of at most this many words are hashed together, in one pass


def checksums(xs: Sequence) -> jax.Array:
    """Two uint32 hashes of the bits of each array of `xs`, as a `(len(xs), 2)` array.

    Large arrays are hashed and summed one by one (fused, no copy); small ones are
    concatenated and hashed in one pass, which costs far less than many tiny reductions.
    Nothing of the size of the arrays is baked into the program as a constant.
    """
    words = [_words(jnp.asarray(x)) for x in xs]
    out: list = [None] * len(words)
    small = [i for i, w in enumerate(words) if w.size <= _SMALL]
    for i, w in enumerate(words):
        if w.size > _SMALL:
            out[i] = jnp.sum(
                _hash_words(w, jnp.arange(w.size, dtype=jnp.uint32)),
                axis=0,
                dtype=jnp.uint32,
            )
    if small:
        bounds = np.cumsum([0] + [words[i].size for i in small]).astype(np.int32)
        cat = jnp.concatenate([words[i] for i in small])
        iota = jnp.arange(cat.size, dtype=jnp.int32)
        starts = jnp.asarray(bounds[:-1])
        # Which array each word belongs to: a running count of the starts passed.
        segment = (
            jnp.cumsum(jnp.zeros(cat.size, jnp.int32).at[starts].add(1, mode="drop"))
            - 1
        )
        pos = (iota - starts[segment]).astype(jnp.uint32)
        sums = jax.ops.segment_sum(
            _hash_words(cat, pos),
            segment,
            num_segments=len(small),
            indices_are_sorted=True,
        )
        for k, i in enumerate(small):
            out[i] = sums[k]
    return jnp.stack(out) if out else jnp.zeros((0, 2), jnp.uint32)


def checksum(x) -> jax.Array:
    """`checksums` of one array: its two hashes."""
    return checksums([x])[0]


def same_bits(x, y) -> jax.Array:
    """Whether two arrays hold the very same bits (NaNs included)."""
    return jnp.array_equal(_words(jnp.asarray(x)), _words(jnp.asarray(y)))


def _plan_from(treedef, infos, decided: Decided) -> Plan:
    kinds, paths, checked = [], [], []
    for i, (info, d) in enumerate(zip(infos, decided.decisions)):
        if isinstance(d, Pass):
            kinds.append(("pass", d.index))
        elif is_arraylike(info.leaf):
            if i in decided.check:
                checked.append(len(paths))
            kinds.append(("array", d))
            paths.append(info.path)
        else:
            kinds.append(("static", info.leaf))
    return Plan(treedef, tuple(kinds), tuple(paths), tuple(checked))


def _infos(out, local, varying_of) -> tuple[Any, list[LeafInfo]]:
    flat, treedef = jtu.tree_flatten_with_path(out)
    ids = {id(t): j for j, t in enumerate(local)}
    infos = []
    for path, leaf in flat:
        j = ids.get(id(leaf))
        if j is not None and local[j] is not leaf:
            j = None
        varying = varying_of(leaf) if is_arraylike(leaf) else None
        infos.append(LeafInfo(path, leaf, j, varying))
    return treedef, infos


class Compiled:
    """One compiled program for one call signature."""

    def __init__(
        self, plan: Plan, run: Callable, in_shardings: tuple | None, extra_out: bool
    ):
        self.plan = plan
        self.run = run  # the jitted program, over the list of dynamic inputs
        self.in_shardings = in_shardings
        self.extra_out = (
            extra_out  # whether the last output is the check's flags or token
        )
        self._only_arrays = all(kind == "array" for kind, _ in plan.kinds)

    def place(self, dyn: Sequence) -> list:
        """`dyn`, with every input moved to the layout the program expects."""
        if self.in_shardings is None:
            return list(dyn)
        return [
            x if getattr(x, "sharding", None) == s else jax.device_put(x, s)
            for x, s in zip(dyn, self.in_shardings)
        ]

    def __call__(self, dyn: Sequence) -> tuple[Any, jax.Array | None]:
        """Runs the program; returns the output tree, and the last extra output (the
        run-time check's flags, True where a replicated leaf differs between devices, or
        the token of the raising check), or None."""
        outs = self.run(*self.place(dyn))
        extra = None
        if self.extra_out:
            *outs, extra = outs
        return self.assemble(dyn, outs), extra

    def assemble(self, dyn, outs):
        if self._only_arrays:
            return self.plan.treedef.unflatten(outs)
        it = iter(outs)
        leaves = []
        for kind, value in self.plan.kinds:
            if kind == "array":
                leaves.append(next(it))
            elif kind == "pass":
                leaves.append(dyn[value])
            else:
                leaves.append(value)
        return self.plan.treedef.unflatten(leaves)

    def mismatched(self, flags) -> list[str]:
        """The paths of the checked leaves whose flag is set (waits for the flags)."""
        bad = np.asarray(flags)
        return [
            keystr(self.plan.array_paths[i])
            for i, b in zip(self.plan.checked, bad)
            if b
        ]


@contextlib.contextmanager
def _all_gather_typed_invariant():
    """While the abstract traces run, `jax.lax.all_gather` types its result as invariant.

    Its result is the same on every device, but JAX 0.10 types it as varying by default
    (for its transpose rule), so without this the trace could not tell that an
    `all_gather`ed value is replicated. Only the decisions are traced this way; the real
    program is traced with JAX's own `all_gather`. (This patches a private function of JAX
    0.10.2, the pinned version; `tests/test_pmap2.py` pins the behaviour.)
    """
    from jax._src.lax import parallel

    original = getattr(parallel, "_all_gather", None)
    invariant = getattr(parallel, "all_gather_invariant", None)
    if original is None or invariant is None:
        yield
        return

    def patched(x, axis_name, *, axis_index_groups, axis, tiled, is_async):
        if axis_index_groups is None and not is_async:
            return invariant(x, axis_name, axis=axis, tiled=tiled)
        return original(
            x,
            axis_name,
            axis_index_groups=axis_index_groups,
            axis=axis,
            tiled=tiled,
            is_async=is_async,
        )

    with _lock:
        parallel._all_gather = patched
        try:
            yield
        finally:
            parallel._all_gather = original


def _squeeze_mapped(xs, in_axes):
    return [x if a is None else jnp.squeeze(x, a) for x, a in zip(xs, in_axes)]


def _build_sharded(
    fn, dyn, in_axes, mesh: Mesh, axis_name, decide, pvary_inputs, donate, check
):
    in_specs = tuple(axis_spec(axis_name, a) for a in in_axes)
    holder = {}

    def varying_of(leaf):
        return axis_name in jax.typeof(leaf).manual_axis_type.varying

    def body_trace(*xs, pvary, record_only, typed):
        local = _squeeze_mapped(xs, in_axes)
        if pvary:
            local = [
                x if varying_of(x) else jax.lax.pcast(x, axis_name, to="varying")
                for x in local
            ]
        out = fn(local)
        # Untyped: nothing is known of what varies, so everything counts as varying.
        treedef, infos = _infos(out, local, varying_of if typed else lambda _: True)
        if record_only:
            holder["alone"] = [info.varying for info in infos]
            return []
        if "alone" in holder:
            infos = [
                info._replace(varying_alone=a)
                for info, a in zip(infos, holder["alone"], strict=True)
            ]
        try:
            decided = decide(out, infos)
        except Exception as e:
            holder["decide_error"] = e
            raise
        plan = holder["plan"] = _plan_from(treedef, infos, decided)
        arrays = [
            jnp.asarray(info.leaf)
            for info, (k, _) in zip(infos, plan.kinds)
            if k == "array"
        ]
        return [a[None] for a in arrays]

    abstract = [_abstract(x) for x in dyn]

    def trace(pvary, record_only, typed=True):
        body = functools.partial(
            body_trace, pvary=pvary, record_only=record_only, typed=typed
        )
        with _all_gather_typed_invariant():
            jax.eval_shape(
                jax.shard_map(
                    body,
                    mesh=mesh,
                    in_specs=in_specs,
                    out_specs=P(axis_name),
                    check_vma=typed,
                ),
                *abstract,
            )

    try:
        if pvary_inputs:
            # First with replicated inputs invariant, then as per-device copies (the real
            # program's semantics); `decide` sees both.
            trace(False, True)
        trace(pvary_inputs, False)
    except Exception:
        if "decide_error" in holder:
            raise
        # JAX 0.10's typing of what varies over the axis cannot follow everything: a
        # collective over a `jax.vmap` axis inside the body, for one, fails to trace with
        # `check_vma=True`. Trace without it, knowing nothing of what varies: every output
        # counts as varying (`varying_alone` unknown), and every replicated one is checked
        # at run time. An error of the function itself is raised again here, as itself.
        holder.clear()
        trace(False, False, typed=False)
    plan: Plan = holder["plan"]
    array_axes = [v for k, v in plan.kinds if k == "array"]
    out_specs = [axis_spec(axis_name, a) for a in array_axes]

    def body_run(*xs):
        local = _squeeze_mapped(xs, in_axes)
        out = fn(local)
        leaves = jtu.tree_leaves(out)
        if len(leaves) != len(plan.kinds):
            raise RuntimeError(
                "The mapped function returned a different structure when traced a second time; "
                "it must be a pure function of its inputs."
            )
        arrays = [
            jnp.asarray(x) for x, (k, _) in zip(leaves, plan.kinds) if k == "array"
        ]
        res = [
            x if a is None else jnp.expand_dims(x, a)
            for x, a in zip(arrays, array_axes)
        ]
        if checking:
            sums = checksums([arrays[i] for i in plan.checked])
            # One collective: pmin(x) is ~pmax(~x) for unsigned ints.
            top = jax.lax.pmax(jnp.stack([sums, ~sums]), axis_name)
            flags = jnp.any(top[0] != ~top[1], axis=1)
            if check == "raise":
                # Every device holds the same flags, so every device raises, and no device is
                # left waiting in a collective. Nothing follows this in the program.
                res.append(
                    jax.lax.cond(
                        jnp.any(flags),
                        lambda f: jax.pure_callback(
                            raise_if_bad, jax.ShapeDtypeStruct((), jnp.bool_), f
                        ),
                        lambda f: jnp.zeros((), jnp.bool_),
                        flags,
                    )
                )
            else:
                res.append(flags)
        return res

    checking = bool(plan.checked) and check != "off"
    paths = [keystr(plan.array_paths[c]) for c in plan.checked]

    def raise_if_bad(flags):
        bad = [p for p, b in zip(paths, np.asarray(flags)) if b]
        if bad:
            raise ReplicationError(replication_message(bad, axis_name))
        return np.zeros((), np.bool_)

    if checking:
        out_specs.append(P())
    mapped = jax.shard_map(
        body_run, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
    )
    in_shardings = tuple(NamedSharding(mesh, s) for s in in_specs)
    run = jax.jit(mapped, donate_argnums=tuple(donate))
    return Compiled(plan, run, in_shardings, checking)


def _build_vmapped(fn, dyn, in_axes, axis_size, axis_name, decide, donate):
    holder = {}

    def body_trace(*xs):
        local = list(xs)
        out = fn(local)
        treedef, infos = _infos(out, local, lambda leaf: None)
        decided = decide(out, infos)
        plan = _plan_from(treedef, infos, decided)
        holder["plan"] = plan
        return [
            jnp.asarray(info.leaf)
            for info, (k, _) in zip(infos, plan.kinds)
            if k == "array"
        ]

    abstract = [_abstract(x) for x in dyn]
    vm = dict(axis_name=axis_name, axis_size=axis_size)
    jax.eval_shape(
        jax.vmap(body_trace, in_axes=tuple(in_axes), out_axes=0, **vm), *abstract
    )
    plan: Plan = holder["plan"]
    array_axes = [v for k, v in plan.kinds if k == "array"]

    def body_run(*xs):
        leaves = jtu.tree_leaves(fn(list(xs)))
        return [jnp.asarray(x) for x, (k, _) in zip(leaves, plan.kinds) if k == "array"]

    # Replicated leaves that are batched in the trace: made with a batch axis, then
    # compared member by member at run time (exactly, on this one device) and unstacked.
    batched = []
    try:
        jax.eval_shape(
            jax.vmap(body_run, in_axes=tuple(in_axes), out_axes=array_axes, **vm),
            *abstract,
        )
    except ValueError:
        for i, a in enumerate(array_axes):
            if a is not None:
                continue
            try:
                jax.eval_shape(
                    jax.vmap(
                        lambda *xs, i=i: body_run(*xs)[i],
                        in_axes=tuple(in_axes),
                        out_axes=None,
                        **vm,
                    ),
                    *abstract,
                )
            except ValueError:
                batched.append(i)
        if not batched:
            raise
    run_axes = [0 if i in batched else a for i, a in enumerate(array_axes)]
    mapped = jax.vmap(body_run, in_axes=tuple(in_axes), out_axes=run_axes, **vm)

    def program(*xs):
        outs = list(mapped(*xs))
        if not batched:
            return outs
        flags = []
        for i in batched:
            first = outs[i][0]
            flags.append(
                ~jnp.all(jax.vmap(lambda m, first=first: same_bits(m, first))(outs[i]))
            )
            outs[i] = first
        return outs + [jnp.stack(flags)]

    plan = dataclasses.replace(plan, checked=tuple(batched))
    return Compiled(
        plan, jax.jit(program, donate_argnums=tuple(donate)), None, bool(batched)
    )


def compiled(
    key,
    fn: Callable[[list], Any],
    dyn: Sequence,
    in_axes: Sequence[int | None],
    decide: Callable[[Any, list[LeafInfo]], Decided],
    *,
    mesh: Mesh | None = None,
    axis_name=None,
    axis_size: int | None = None,
    pvary_inputs: bool = False,
    donate: Sequence[int] = (),
    check: str = "flags",
) -> Compiled:
    """The compiled program for `fn` over these inputs, from the cache when it is there.

    **Arguments:**

    - `key`: everything about `fn` and `decide` that is not in the inputs (hashable), or
        None for a caller that keeps its own cache.
    - `fn`: takes the list of per-device inputs (mapped axes removed), returns a pytree.
    - `dyn`: the global input arrays.
    - `in_axes`: per input, the position of its mapped axis, or None for replicated.
    - `decide`: picks each output leaf's layout from the abstract trace.
    - `mesh`: run over this mesh's axis `axis_name` (shard_map); else `axis_size`
        members of a vmapped batch axis.
    - `pvary_inputs`: trace with replicated inputs taken as per-device copies (the
        semantics of the real program), after a first trace with them invariant whose
        findings are `LeafInfo.varying_alone`.
    - `donate`: indices of `dyn` to donate.
    - `check`: what the run-time check of replicated leaves gives: `"flags"` (a vector,
        the last output), `"raise"` (a `ReplicationError` raised from every device; the
        results fail when waited on), or `"off"`.
    """
    sig = (
        key,
        mesh,
        axis_name,
        axis_size,
        tuple(in_axes),
        tuple(aval_key(x) for x in dyn),
        pvary_inputs,
        tuple(donate),
        check,
    )
    entry = _cache.get(sig) if key is not None else None
    if entry is None:
        if mesh is not None:
            entry = _build_sharded(
                fn, dyn, in_axes, mesh, axis_name, decide, pvary_inputs, donate, check
            )
        else:
            entry = _build_vmapped(
                fn, dyn, in_axes, axis_size, axis_name, decide, donate
            )
        if key is not None:
            with _lock:
                _cache[sig] = entry
    return entry
