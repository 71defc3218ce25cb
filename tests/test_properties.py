"""Property-based tests of `pmap2_new_states` and `vmap2_new_states`: random trees and
random `state_out_axes`, checked against the assignment rule computed here on its own:
the layout (shape, sharding, values), `describe`, `states_by_axis`, the warnings for
filters that match nothing, errors that name a path, inputs left untouched, and `pmap2`
steps that keep the layout."""

import re
import warnings
from collections.abc import Iterator
from typing import Any as AnyType, cast, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from helpers import assert_laid_out, N
from hypothesis import assume, event, given, HealthCheck, settings, strategies as st
from jax.sharding import NamedSharding

import eqx_pmapstate as ep
from eqx_pmapstate.filters import Everything, OfType, PathContains, WithTag


SETTINGS: dict[str, AnyType] = dict(
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.filter_too_much,
        HealthCheck.data_too_large,
    ],
)


class Block(eqx.Module):
    a: AnyType
    b: AnyType


class Cell(eqx.Module):
    x: AnyType
    label: str = eqx.field(static=True, default="c")


class Holder(eqx.Module):
    held: AnyType
    new: AnyType = None
    tree: tuple = eqx.field(static=True, default=("none",))
    vary: frozenset = eqx.field(static=True, default=frozenset())

    def init_state(self):
        idx = jax.lax.axis_index("devices")
        new = _build(self.tree, idx, self.vary)
        return Holder(self.held, new, self.tree, self.vary)


# --------------------------------------------------------------------------- trees
#
# A tree is described by nested tuples: ("arr", uid, dtype, shape), ("static", value),
# ("none",), ("marker", cls, tag, value), ("list", children), ("tuple", children),
# ("dict", ((key, child), ...)), ("block", a, b), ("cell", x, label).

MARKERS = (
    ep.State,
    ep.ParamState,
    ep.ShortTermState,
    ep.LongTermState,
    ep.NonBatchState,
)
DTYPES = ("float32", "int32", "bool", "bfloat16")
SHAPES = ((), (2,), (3,), (2, 3), (0,), (3, 0), (1,))

_arrays = st.builds(
    lambda d, s: ("arr", 0, d, s), st.sampled_from(DTYPES), st.sampled_from(SHAPES)
)
_statics = st.sampled_from(
    [("none",), ("static", 3), ("static", "s"), ("list", ()), ("dict", ())]
)


def _markers(values):
    return st.builds(
        lambda c, t, v: ("marker", c, t, v),
        st.sampled_from(MARKERS),
        st.sampled_from([None, "a", "b"]),
        values,
    )


def _sequences(children):
    return st.one_of(
        st.lists(children, min_size=1, max_size=3).map(lambda c: ("list", tuple(c))),
        st.lists(children, min_size=1, max_size=2).map(lambda c: ("tuple", tuple(c))),
        st.dictionaries(st.sampled_from("pq"), children, min_size=1).map(
            lambda d: ("dict", tuple(sorted(d.items())))
        ),
    )


def _containers(children):
    return st.one_of(
        _sequences(children),
        st.builds(lambda a, b: ("block", a, b), children, children),
        st.builds(lambda x, label: ("cell", x, label), children, st.sampled_from("cd")),
    )


# What a marker holds: arrays, maybe beside static leaves and nested markers (a nested
# `NonBatchState` is a state of its own, whose ancestors are every object between the
# root and it, modules included; any other nested marker belongs to the outer).
_parts = st.one_of(_arrays, _arrays, _markers(_arrays), _statics)
# (A marker's whole value is not a Python number: a marker makes that an array, which
# `tests/test_new_states.py` checks.)
_not_numbers = st.sampled_from([("none",), ("static", "s"), ("list", ()), ("dict", ())])
_values = st.one_of(
    _arrays, _arrays, _sequences(_parts), _containers(_parts), _not_numbers
)
_leaves = st.one_of(_arrays, _markers(_values), _arrays, _markers(_values), _statics)
_trees = st.one_of(
    _leaves,
    _containers(st.one_of(_leaves, _leaves, _containers(_leaves))),
    _containers(st.one_of(_leaves, _leaves, _containers(_leaves))),
)


def _number(node, counter=None):
    """The same tree with its arrays numbered 0, 1, ... in order."""
    counter = [0] if counter is None else counter
    kind = node[0]
    if kind == "arr":
        counter[0] += 1
        return ("arr", counter[0] - 1, node[2], node[3])
    if kind == "marker":
        return ("marker", node[1], node[2], _number(node[3], counter))
    if kind in ("list", "tuple"):
        return (kind, tuple(_number(c, counter) for c in node[1]))
    if kind == "dict":
        return ("dict", tuple((k, _number(c, counter)) for k, c in node[1]))
    if kind == "block":
        return ("block", _number(node[1], counter), _number(node[2], counter))
    if kind == "cell":
        return ("cell", _number(node[1], counter), node[2])
    return node


trees = _trees.map(_number)


def _array(node, i):
    _, uid, dtype, shape = node
    base = uid % 5 + 1
    if dtype == "bool":
        return jnp.full(shape, (base + i) % 2 == 0)
    return jnp.full(shape, base + i, dtype=dtype)


def _np_array(node, i):
    _, uid, dtype, shape = node
    base = uid % 5 + 1
    if dtype == "bool":
        return np.full(shape, (base + i) % 2 == 0)
    return np.full(shape, base + i, dtype=jnp.dtype(dtype))


def _build(node, idx, vary):
    """The tree that `node` describes; the arrays in `vary` depend on `idx`."""
    kind = node[0]
    if kind == "arr":
        return _array(node, idx if node[1] in vary else 0)
    if kind == "static":
        return node[1]
    if kind == "none":
        return None
    if kind == "marker":
        return node[1](_build(node[3], idx, vary), tag=node[2])
    if kind == "list":
        return [_build(c, idx, vary) for c in node[1]]
    if kind == "tuple":
        return tuple(_build(c, idx, vary) for c in node[1])
    if kind == "dict":
        return {k: _build(c, idx, vary) for k, c in node[1]}
    if kind == "block":
        return Block(_build(node[1], idx, vary), _build(node[2], idx, vary))
    assert kind == "cell"
    return Cell(_build(node[1], idx, vary), node[2])


def _builder(tree, vary, axis_name):
    def build():
        return _build(tree, jax.lax.axis_index(axis_name), vary)

    return build


# --------------------------------------------------------------------------- the rule, here

_CLASS = {"list": list, "tuple": tuple, "dict": dict, "block": Block, "cell": Cell}


def _children(node):
    """`(key entry, child)` for each child of a container node, in flatten order."""
    kind = node[0]
    if kind in ("list", "tuple"):
        return [(jtu.SequenceKey(i), c) for i, c in enumerate(node[1])]
    if kind == "dict":
        return [(jtu.DictKey(k), c) for k, c in node[1]]
    if kind == "block":
        return [(jtu.GetAttrKey("a"), node[1]), (jtu.GetAttrKey("b"), node[2])]
    if kind == "cell":
        return [(jtu.GetAttrKey("x"), node[1])]
    if kind == "marker":
        return [(jtu.GetAttrKey("value"), node[3])]
    return []


def _states(node, path=(), ancestors=()) -> Iterator[dict[str, AnyType]]:
    """Each state as a dict: path, marker class (None for a bare array), tag, the
    classes of the objects that enclose it, and its own `(path, arr node)` leaves."""
    kind = node[0]
    if kind == "arr":
        yield dict(path=path, cls=None, tag=None, anc=ancestors, leaves=[(path, node)])
    elif kind == "marker":
        own, nested = [], []

        def walk(n, p, anc):
            if n[0] == "arr":
                own.append((p, n))
            elif n[0] == "marker" and n[1] is ep.NonBatchState:
                nested.append((n, p, anc))
            else:
                for key, c in _children(n):
                    walk(c, p + (key,), anc + (_CLASS.get(n[0], n[1]),))

        walk(node[3], path + (jtu.GetAttrKey("value"),), ancestors + (node[1],))
        yield dict(path=path, cls=node[1], tag=node[2], anc=ancestors, leaves=own)
        for n, p, anc in nested:
            yield from _states(n, p, anc)
    else:
        for key, c in _children(node):
            yield from _states(c, path + (key,), ancestors + (_CLASS[kind],))


def _entry_value(entry):
    return getattr(entry, "name", getattr(entry, "key", getattr(entry, "idx", None)))


def _matches(f, s) -> bool:
    kind = f[0]
    if kind == "all":
        return True
    if kind == "type":
        classes = ((s["cls"],) if s["cls"] else ()) + s["anc"]
        return any(issubclass(c, f[1]) for c in classes)
    if kind == "tag":
        return s["cls"] is not None and s["tag"] == f[1]
    if kind == "path":
        return any(_entry_value(e) == f[1] for e in s["path"])
    if kind == "or":
        return _matches(f[1], s) or _matches(f[2], s)
    if kind == "and":
        return _matches(f[1], s) and _matches(f[2], s)
    assert kind == "not"
    return not _matches(f[1], s)


def _position(axis, ndim):
    """Where the new axis lands (`jnp.expand_dims`'s rule), or None if out of range."""
    pos = axis if axis >= 0 else axis + ndim + 1
    return pos if 0 <= pos <= ndim else None


class Expected(NamedTuple):
    positions: dict  # leaf path -> (position or None, arr node, whether it varies)
    states: list  # the states that hold arrays
    offending: set  # the paths an error may name; empty: no error expected
    unmatched: list  # the `(axis, filter)` entries that match no state


def expected_layout(tree, spec, prefix=(), ancestors=()):
    """The layout the assignment rule gives the new arrays of `tree`, for `spec`."""
    positions, offending, matched = {}, set(), [False] * len(spec)
    states = [s for s in _states(tree, prefix, ancestors) if s["leaves"]]
    for s in states:
        hits, catch_all = [], []
        for i, (axis, f) in enumerate(spec):
            if _matches(f, s):
                matched[i] = True
                (catch_all if f[0] == "all" else hits).append(axis)
        axes = list(dict.fromkeys(hits or catch_all))
        if s["cls"] is ep.NonBatchState:
            axes = [None]
        where = _keystr(s["path"])
        if len(axes) > 1:
            offending.add(where)
            axes = [0]  # its arrays still vary in the builder
        axis = axes[0] if axes else 0
        for p, leaf in s["leaves"]:
            pos = None if axis is None else _position(axis, len(leaf[3]))
            if axis is not None and pos is None:
                offending.update((where, _keystr(p)))
                pos = 0
            positions[p] = (pos, leaf, axis is not None)
    unmatched = [
        (axis, f) for (axis, f), hit in zip(spec, matched) if not hit and f[0] != "all"
    ]
    return Expected(positions, states, offending, unmatched)


# --------------------------------------------------------------------------- filters

TYPES = MARKERS + (Block, Cell)
TAGS = ("a", "b")
KEYS = ("a", "b", "x", "p", "q", 0, 1, "value", "w")


def _features(tree):
    """The types, tags and path keys found in `tree`: filters mostly ask about these,
    so that they match something and often overlap."""
    types, tags, keys = set(), set(), set()
    for s in _states(tree):
        types.update(c for c in ((s["cls"],) + s["anc"]) if c in TYPES)
        tags.add(s["tag"])
        keys.update(_entry_value(e) for e in s["path"])
    return (
        sorted(types, key=TYPES.index) or list(TYPES),
        sorted(tags & set(TAGS)) or list(TAGS),
        sorted(keys & set(KEYS), key=KEYS.index) or list(KEYS),
    )


_any_atom = st.one_of(
    st.builds(lambda t, s: ("type", t, s), st.sampled_from(TYPES), st.booleans()),
    st.builds(lambda t, s: ("tag", t, s), st.sampled_from(TAGS), st.booleans()),
    st.builds(lambda k: ("path", k), st.sampled_from(KEYS)),
)


def _filters(types, tags, keys):
    atoms = st.one_of(
        st.builds(lambda t, s: ("type", t, s), st.sampled_from(types), st.booleans()),
        st.builds(lambda t, s: ("tag", t, s), st.sampled_from(tags), st.booleans()),
        st.builds(lambda k: ("path", k), st.sampled_from(keys)),
    )
    atoms = st.one_of(atoms, atoms, atoms, _any_atom)
    return st.recursive(
        atoms,
        lambda f: st.one_of(
            st.builds(lambda a, b, s: ("or", a, b, s), f, f, st.booleans()),
            st.builds(lambda a, b: ("and", a, b), f, f),
            st.builds(lambda a: ("not", a), f),
        ),
        max_leaves=3,
    )


def _written(f, top=True):
    """A filter AST as a user writes it: shorthands at the top, objects inside."""
    kind = f[0]
    if kind == "all":
        return (..., True, Everything())[f[1]]
    if kind == "type":
        return f[1] if top and f[2] else OfType(f[1])
    if kind == "tag":
        return f[1] if top and f[2] else WithTag(f[1])
    if kind == "path":
        return PathContains(f[1])
    if kind == "or":
        if top and f[3]:
            return [_written(f[1]), _written(f[2])]
        return _written(f[1], False) | _written(f[2], False)
    if kind == "and":
        return _written(f[1], False) & _written(f[2], False)
    return ~_written(f[1], False)


@st.composite
def cases(draw):
    """`(tree, a function making state_out_axes as written, the rule's spec: ((axis,
    filter AST), ...))`."""
    tree = draw(trees)
    filters = _filters(*_features(tree))
    entries = st.one_of(
        filters, filters, st.builds(lambda k: ("all", k), st.sampled_from(range(3)))
    )
    form = draw(st.sampled_from(["none", "single", "dict", "dict", "dict", "dict"]))
    # `state_out_axes` as written is made in the test, not here: making filters runs the
    # library's code, which must not run while hypothesis draws (under jaxtyping's import
    # hook, beartype's checks use the `random` module).
    if form == "none":
        return tree, lambda: None, ()
    if form == "single":
        f = draw(entries)
        return tree, lambda: _written(f), ((0, f),)
    axes = draw(
        st.lists(
            st.sampled_from([0, 1, -1, None, 0, 1, -1, None, 2, -2]),
            min_size=1,
            max_size=3,
            unique=True,
        )
    )
    spec = tuple((axis, draw(entries)) for axis in axes)
    return tree, lambda: {axis: _written(f) for axis, f in spec}, spec


# --------------------------------------------------------------------------- checks


def _paths_named(msg):
    return set(re.findall(r"<root>|(?:\.\w+|\[[^\]]*\])+", msg))


def _call(
    fn, *args, **kwargs
) -> tuple[AnyType, ValueError | TypeError | None, list[warnings.WarningMessage]]:
    """Calls `fn`, returning `(result or None, exception or None, warnings)`."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return fn(*args, **kwargs), None, caught
        except (ValueError, TypeError) as e:
            return None, e, caught


def _check_raised(err, offending):
    assert err is not None, f"expected an error naming one of {offending}"
    assert _paths_named(str(err)) & offending, (str(err), offending)


def _check_warnings(caught, unmatched):
    msgs = [str(w.message) for w in caught]
    assert all(issubclass(w.category, UserWarning) for w in caught), msgs
    assert len(msgs) == len(unmatched), (msgs, unmatched)
    for axis, f in unmatched:
        shown = repr(ep.filters.to_predicate(_written(f)))
        assert any(shown in m and f"for axis {axis} " in m for m in msgs), (shown, msgs)


def _expected_value(leaf, pos, varies, n):
    if pos is None:
        return _np_array(leaf, 0)
    return np.stack([_np_array(leaf, i if varies else 0) for i in range(n)], axis=pos)


def _check_layout(out, expected, n, *, sharded):
    """Every new array of `out` is where the rule puts it, with the builder's values;
    `describe` and `states_by_axis` agree."""
    positions = expected.positions
    arrays = {
        p: x
        for p, x in jtu.tree_flatten_with_path(out)[0]
        if isinstance(x, jax.Array) and p in positions
    }
    assert set(arrays) == set(positions)
    for p, (pos, leaf, varies) in positions.items():
        x = arrays[p]
        want = _expected_value(leaf, pos, varies, n)
        assert x.shape == want.shape, (jtu.keystr(p), x.shape, want.shape)
        assert x.dtype == want.dtype
        _check_values(x, want)
        if sharded:
            assert_laid_out(x, pos, n=n)
    rows = _describe_rows(out)
    for s in expected.states:
        marker = s["cls"].__name__ if s["cls"] else "-"
        for p, _ in s["leaves"]:
            assert rows.pop(_keystr(p)) == (marker, str(positions[p][0]))
    assert all(axis == "-" for _, axis in rows.values()), rows  # held arrays
    listed = {
        _keystr(path): axis
        for axis, group in ep.states_by_axis(out).items()
        for path, _ in group
    }
    assert len(listed) == sum(len(g) for g in ep.states_by_axis(out).values())
    assert set(listed) == {_keystr(s["path"]) for s in expected.states}
    for s in expected.states:
        # a state's arrays may differ in rank, so axis -1 may land at several positions
        assert listed[_keystr(s["path"])] in {positions[p][0] for p, _ in s["leaves"]}


def _check_values(x, want):
    # Zero-size arrays are not read back: on JAX 0.10.2 one laid out along a device axis
    # holds whole-size shards under a sharded label, and `np.asarray` raises.
    if x.size:
        np.testing.assert_array_equal(
            np.asarray(x).astype(np.float32), want.astype(np.float32)
        )


def _keystr(path):
    return jtu.keystr(path) if path else "<root>"


def _describe_rows(tree):
    """`describe`'s table as {path: (marker, axis)}, one row per array."""
    lines = ep.describe(tree).splitlines()
    assert re.split(r"\s{2,}", lines[0])[:3] == ["path", "marker", "axis"]
    rows = {}
    for line in lines[2:-1]:
        cells = re.split(r"\s{2,}", line.strip())
        assert cells[0] not in rows
        rows[cells[0]] = (cells[1], cells[2])
    assert int(lines[-1].split()[0]) == len(rows)
    return rows


def _vary(expected):
    return frozenset(
        leaf[1] for _, leaf, varies in expected.positions.values() if varies
    )


def _check_statics(out, tree):
    """The tree structure and the non-array leaves are as the builder made them."""
    made = _build(tree, 0, frozenset())
    assert jtu.tree_structure(out) == jtu.tree_structure(made)
    statics = [x for x in jtu.tree_leaves(out) if not isinstance(x, jax.Array)]
    assert statics == [x for x in jtu.tree_leaves(made) if not isinstance(x, jax.Array)]


def _bump_leaf(x):
    return ~x if x.dtype == jnp.bool_ else x + jnp.ones((), x.dtype)


def _bump(tree):
    return jax.tree.map(lambda x: _bump_leaf(x) if eqx.is_array(x) else x, tree)


_step = ep.pmap2(_bump)


# --------------------------------------------------------------------------- properties


@settings(max_examples=300, **SETTINGS)
@given(case=cases(), n=st.sampled_from([N, N, 2]))
def test_pmap2_new_states_follows_the_rule(case, n):
    tree, written, spec = case
    written = written()
    expected = expected_layout(tree, spec)
    build = _builder(tree, _vary(expected), "devices")
    event("raises" if expected.offending else "lays out")
    # The second call reuses what the first compiled (or raises again).
    for _ in range(2):
        out, err, caught = _call(
            ep.pmap2_new_states, build, axis_size=n, state_out_axes=written
        )
        if expected.offending:
            _check_raised(err, expected.offending)
            continue
        assert err is None, err
        _check_warnings(caught, expected.unmatched)
        _check_statics(out, tree)
        _check_layout(out, expected, n, sharded=True)


@settings(max_examples=150, **SETTINGS)
@given(case=cases(), k=st.integers(1, 3))
def test_vmap2_new_states_follows_the_rule(case, k):
    tree, written, spec = case
    written = written()
    expected = expected_layout(tree, spec)
    build = _builder(tree, _vary(expected), "members")
    out, err, caught = _call(
        ep.vmap2_new_states,
        build,
        axis_size=k,
        state_out_axes=written,
        axis_name="members",
    )
    event("raises" if expected.offending else "lays out")
    if expected.offending:
        _check_raised(err, expected.offending)
        return
    assert err is None, err
    _check_warnings(caught, expected.unmatched)
    _check_statics(out, tree)
    _check_layout(out, expected, k, sharded=False)


@settings(max_examples=150, **SETTINGS)
@given(case=cases())
def test_init_state_input_is_untouched(case):
    tree, written, spec = case
    written = written()
    expected = expected_layout(tree, spec, (jtu.GetAttrKey("new"),), (Holder,))
    w, c = jnp.arange(3.0), jnp.ones((2,), jnp.int32)
    module = Holder(
        {"w": ep.ParamState(w, tag="a"), "c": c}, None, tree, _vary(expected)
    )
    out, err, caught = _call(ep.pmap2_new_states, module, state_out_axes=written)
    event("raises" if expected.offending else "lays out")
    assert module.held["w"].value is w and module.held["c"] is c
    assert module.new is None
    np.testing.assert_array_equal(np.asarray(w + 1), [1.0, 2.0, 3.0])  # still usable
    np.testing.assert_array_equal(np.asarray(c * 2), [2, 2])
    if expected.offending:
        _check_raised(err, expected.offending)
        return
    assert err is None, err
    _check_warnings(caught, expected.unmatched)
    np.testing.assert_array_equal(np.asarray(out.held["w"].value), [0.0, 1.0, 2.0])
    np.testing.assert_array_equal(np.asarray(out.held["c"]), [1, 1])
    _check_statics(out.new, tree)
    _check_layout(out, expected, N, sharded=True)


# One step over random trees: compiling again for every structure is the point here.
@pytest.mark.filterwarnings("ignore::eqx_pmapstate.RecompileWarning")
@settings(max_examples=80, **SETTINGS)
@given(case=cases())
def test_pmap2_steps_keep_the_layout(case):
    tree, written, spec = case
    written = written()
    expected = expected_layout(tree, spec)
    assume(expected.positions and not expected.offending)
    build = _builder(tree, _vary(expected), "devices")
    out, err, _ = _call(ep.pmap2_new_states, build, state_out_axes=written)
    assert err is None, err
    layout = {p: (x.shape, _spec_of(x)) for p, x in _arrays_of(out).items()}
    for k in range(1, 4):
        out = _step(out)
        arrays = _arrays_of(out)
        assert {p: (x.shape, _spec_of(x)) for p, x in arrays.items()} == layout
        for p, (pos, leaf, varies) in expected.positions.items():
            assert_laid_out(arrays[p], pos)
            want = _expected_value(leaf, pos, varies, N)
            want = want ^ bool(k % 2) if want.dtype == np.bool_ else want + k
            _check_values(arrays[p], want)
    _check_statics(out, tree)


def _spec_of(x: jax.Array):
    # The arrays that pmap2_new_states and pmap2 return lie on a mesh.
    return cast(NamedSharding, x.sharding).spec


def _arrays_of(tree):
    return {
        p: x for p, x in jtu.tree_flatten_with_path(tree)[0] if isinstance(x, jax.Array)
    }


def test_filter_that_matches_nothing_warns():
    def build():
        return {"p": ep.ParamState(jnp.zeros(2)), "h": ep.ShortTermState(jnp.zeros(2))}

    axes = {None: ep.ParamState, 1: "no-such-tag"}
    with pytest.warns(UserWarning, match="no-such-tag") as caught:
        out = ep.pmap2_new_states(build, state_out_axes=axes)
    assert len(caught) == 1 and "for axis 1" in str(caught[0].message)
    assert_laid_out(out["p"].value, None)
    assert_laid_out(out["h"].value, 0)
