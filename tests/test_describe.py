"""`describe` and `states_by_axis`: seeing the layout of a distributed tree."""

import re

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np

import eqx_pmapstate as ep
from eqx_pmapstate.filters import PathContains


A = jtu.GetAttrKey
D = jtu.DictKey

HEADER = [
    "path",
    "marker",
    "axis",
    "global shape",
    "per-device shape",
    "dtype",
    "bytes/device",
]


def _rows(table: str) -> dict:
    """The table's rows as {path: {column: cell}}, with the header checked."""
    lines = table.splitlines()
    assert re.split(r"\s{2,}", lines[0].strip()) == HEADER
    assert set(lines[1].replace(" ", "")) == {"-"}
    rows = {}
    for line in lines[2:-1]:
        cells = re.split(r"\s{2,}", line.strip())
        assert len(cells) == len(HEADER), line
        rows[cells[0]] = dict(zip(HEADER, cells))
    return rows


class Model(eqx.Module):
    weight: ep.ParamState | None = None
    hidden: ep.ShortTermState | None = None
    config: ep.NonBatchState | None = None
    extra: dict | None = None

    def init_state(self):
        return Model(
            weight=ep.ParamState(jnp.zeros((4,), jnp.float32)),
            hidden=ep.ShortTermState(jnp.zeros((3, 2), jnp.float32)),
            config=ep.NonBatchState(jnp.array([1.0, 2.0, 3.0])),
            extra={
                "count": jnp.zeros((), jnp.int32),
                "pair": ep.LongTermState((jnp.zeros(2), jnp.zeros(5))),
            },
        )


def _model():
    return ep.pmap2_new_states(
        Model(), state_out_axes={1: PathContains("hidden"), -1: PathContains("pair")}
    )


def test_describe_one_row_per_array_with_cells(leaks):
    out = _model()
    table = ep.describe(out)
    rows = _rows(table)
    n_arrays = len(jtu.tree_leaves(out))
    assert n_arrays == 6
    assert len(rows) == n_arrays
    assert table.splitlines()[-1].startswith(f"{n_arrays} array(s)")

    w = rows[".weight.value"]
    assert w["marker"] == "ParamState"
    assert w["axis"] == "0"
    assert w["global shape"] == "(8, 4)"
    assert w["per-device shape"] == "(1, 4)"
    assert w["dtype"] == "float32"
    assert w["bytes/device"] == "16"

    h = rows[".hidden.value"]
    assert h["marker"] == "ShortTermState"
    assert h["axis"] == "1"
    assert h["global shape"] == "(3, 8, 2)"
    assert h["per-device shape"] == "(3, 1, 2)"
    assert h["dtype"] == "float32"
    assert h["bytes/device"] == "24"

    c = rows[".config.value"]
    assert c["marker"] == "NonBatchState"
    assert c["axis"] == "None"
    assert c["global shape"] == "(3,)"
    assert c["per-device shape"] == "(3,)"
    assert c["dtype"] == "float32"
    assert c["bytes/device"] == "12"

    k = rows[".extra['count']"]
    assert k["marker"] == "-"  # a bare array
    assert k["axis"] == "0"
    assert k["global shape"] == "(8,)"
    assert k["per-device shape"] == "(1,)"
    assert k["dtype"] == "int32"
    assert k["bytes/device"] == "4"

    # a marker holding a pytree: one row per array, all with the marker's axis
    p0 = rows[".extra['pair'].value[0]"]
    p1 = rows[".extra['pair'].value[1]"]
    assert p0["marker"] == p1["marker"] == "LongTermState"
    assert p0["global shape"] == "(2, 8)" and p0["axis"] == "1"
    assert p1["global shape"] == "(5, 8)" and p1["axis"] == "1"
    assert p0["per-device shape"] == "(2, 1)"
    assert p1["per-device shape"] == "(5, 1)"
    assert p0["dtype"] == p1["dtype"] == "float32"
    assert p0["bytes/device"] == "8"
    assert p1["bytes/device"] == "20"

    total = 16 + 24 + 12 + 4 + 8 + 20
    assert f"{total:,} bytes per device" in table.splitlines()[-1]


def test_describe_large_bytes_and_other_dtypes(leaks):
    def make():
        return {
            "big": ep.ParamState(jnp.zeros((256, 64), jnp.float32)),
            "b": jnp.zeros((3,), jnp.bool_),
        }

    out = ep.pmap2_new_states(make, state_out_axes={1: ep.ParamState})
    table = ep.describe(out)
    rows = _rows(table)
    big = rows["['big'].value"]
    assert big["axis"] == "1"
    assert big["global shape"] == "(256, 8, 64)"
    assert big["per-device shape"] == "(256, 1, 64)"
    assert big["dtype"] == "float32"
    assert big["bytes/device"] == "65,536"
    b = rows["['b']"]
    assert b["axis"] == "0"
    assert b["global shape"] == "(8, 3)" and b["per-device shape"] == "(1, 3)"
    assert b["dtype"] == "bool"
    assert b["bytes/device"] == "3"
    assert table.splitlines()[-1] == "2 array(s), 65,539 bytes per device"


def test_describe_vmap_result(leaks):
    def make():
        return {
            "s": ep.ShortTermState(jnp.zeros((3,))),
            "r": ep.NonBatchState(jnp.zeros(2)),
        }

    out = ep.vmap2_new_states(make, axis_size=5, state_out_axes={-1: ...})
    rows = _rows(ep.describe(out))
    s = rows["['s'].value"]
    assert s["marker"] == "ShortTermState"
    assert s["axis"] == "1"
    assert s["global shape"] == "(3, 5)"
    assert s["per-device shape"] == "(3, 5)"  # one device holds every member
    assert s["bytes/device"] == "60"
    r = rows["['r'].value"]
    assert r["marker"] == "NonBatchState"
    assert r["axis"] == "None"
    assert r["global shape"] == r["per-device shape"] == "(2,)"
    assert r["bytes/device"] == "8"


def test_describe_plain_tree_has_no_axis():
    tree = {
        "a": jnp.zeros((2, 3)),
        "m": ep.ParamState(jnp.zeros(4, jnp.int32)),
        "s": "static",
    }
    rows = _rows(ep.describe(tree))
    assert set(rows) == {"['a']", "['m'].value"}
    assert rows["['a']"]["marker"] == "-"
    assert rows["['a']"]["axis"] == "-"
    assert rows["['a']"]["per-device shape"] == "(2, 3)"
    assert rows["['a']"]["bytes/device"] == "24"
    m = rows["['m'].value"]
    assert m["marker"] == "ParamState"
    assert m["axis"] == "-"
    assert m["global shape"] == m["per-device shape"] == "(4,)"
    assert m["dtype"] == "int32" and m["bytes/device"] == "16"


def test_describe_preexisting_leaf_is_not_on_an_axis(leaks):
    class Held(eqx.Module):
        w: jax.Array
        s: ep.ShortTermState | None = None

        def init_state(self):
            return Held(self.w, ep.ShortTermState(jnp.zeros(2)))

    out = ep.pmap2_new_states(Held(jnp.ones(3)))
    rows = _rows(ep.describe(out))
    assert set(rows) == {".w", ".s.value"}
    assert rows[".s.value"]["axis"] == "0"
    assert rows[".s.value"]["global shape"] == "(8, 2)"
    assert rows[".w"]["marker"] == "-"
    assert rows[".w"]["axis"] == "-"
    assert rows[".w"]["global shape"] == rows[".w"]["per-device shape"] == "(3,)"
    layout = ep.states_by_axis(out)
    assert list(layout) == [0]
    assert [p for p, _ in layout[0]] == [(A("s"),)] and layout[0][0][1] is out.s


def test_states_by_axis_matches_the_layout(leaks):
    out = _model()
    layout = ep.states_by_axis(out)
    assert set(layout) == {0, 1, None}
    assert [p for p, _ in layout[0]] == [(A("weight"),), (A("extra"), D("count"))]
    assert [p for p, _ in layout[1]] == [(A("hidden"),), (A("extra"), D("pair"))]
    assert [p for p, _ in layout[None]] == [(A("config"),)]
    # the very states of the tree
    assert layout[0][0][1] is out.weight
    assert layout[0][1][1] is out.extra["count"]
    assert layout[1][0][1] is out.hidden
    assert layout[1][1][1] is out.extra["pair"]
    assert layout[None][0][1] is out.config
    # every array of the tree is listed exactly once
    listed = [x for v in layout.values() for _, s in v for x in jtu.tree_leaves(s)]
    assert sorted(map(id, listed)) == sorted(map(id, jtu.tree_leaves(out)))


def test_states_by_axis_vmap(leaks):
    def make():
        return {
            "a": ep.ParamState(jnp.zeros(2)),
            "b": ep.NonBatchState(jnp.zeros(2)),
            "c": jnp.zeros((2, 2)),
        }

    out = ep.vmap2_new_states(make, axis_size=3, state_out_axes={2: PathContains("c")})
    layout = ep.states_by_axis(out)
    assert {k: [p for p, _ in v] for k, v in layout.items()} == {
        0: [(D("a"),)],
        None: [(D("b"),)],
        2: [(D("c"),)],
    }
    assert out["c"].shape == (2, 2, 3)
    # the very states of the tree
    assert layout[0][0][1] is out["a"]
    assert layout[None][0][1] is out["b"]
    assert layout[2][0][1] is out["c"]


def test_states_by_axis_of_a_plain_tree_is_empty():
    assert (
        ep.states_by_axis({"a": jnp.zeros(2), "m": ep.ParamState(jnp.zeros(2))}) == {}
    )


def test_describe_names_equinox_state_entries_by_their_layer(leaks):
    class Net(eqx.Module):
        norm: eqx.nn.BatchNorm

        def __init__(self):
            self.norm = eqx.nn.BatchNorm(3, ("batch", "devices"), mode="ema")

    net, state = ep.pmap2_new_states(
        eqx.nn.make_with_state(Net), state_out_axes={0: eqx.nn.State, None: ...}
    )
    table = ep.describe((net, state))
    assert set(_rows(table)) == {
        "[0].norm.weight",
        "[0].norm.bias",
        "[1][Net.norm.ema_first_time_index]",
        "[1][Net.norm.ema_state_index][0]",
        "[1][Net.norm.ema_state_index][1]",
    }
    assert "flat index" not in table


def test_axes_of_gives_member_axes_usable_by_filter_vmap(leaks):
    ensemble = ep.vmap2_new_states(
        lambda key: {
            "w": jax.random.normal(key, (2,)),
            "s": ep.NonBatchState(jnp.ones(2)),
        },
        {"key": jax.random.split(jax.random.key(0), 3)},
        axis_size=3,
        init_in_axes={"key": 0},
    )
    axes = ep.axes_of(ensemble)
    assert axes == {"w": 0, "s": ep.NonBatchState(None)}
    out = eqx.filter_vmap(lambda m: m["w"] * m["s"].value, in_axes=(axes,))(ensemble)
    assert out.shape == (3, 2)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ensemble["w"]))


def test_describe_after_a_step_with_the_axes_taken_before(leaks):
    ensemble = ep.vmap2_new_states(
        lambda: ep.State(jnp.ones(2)), axis_size=3, state_out_axes={1: ...}
    )
    axes = ep.axes_of(ensemble)
    stepped = jax.tree.map(lambda x: x + 1, ensemble)  # new arrays: nothing remembered
    assert ep.states_by_axis(stepped) == {}
    assert list(ep.states_by_axis(stepped, axes=axes)) == [1]
    rows = _rows(ep.describe(stepped, axes=axes))
    assert rows[".value"]["marker"] == "State"
    assert rows[".value"]["axis"] == "1"
    assert rows[".value"]["global shape"] == "(2, 3)"
