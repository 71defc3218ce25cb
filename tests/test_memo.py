"""The modules a `pmap2` function returned are not flattened again when they come back
(`_pmap2._memo`). Every test passes such modules back in a way a user could, and checks
the numbers against `jax.jit` or a fresh computation: in containers, twice, after a
change to a mutable part, after they die, after `clear_caches`, from threads, inside
`jax.jit`, and donated."""

import gc
import threading

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import eqx_pmapstate as ep
from eqx_pmapstate._pmap2 import _memo
from eqx_pmapstate.filters import OfType


MESH = jax.make_mesh((8,), ("devices",), axis_types=(jax.sharding.AxisType.Auto,))


def _rep(x):
    return jax.device_put(x, NamedSharding(MESH, P()))


def _split(x):
    return jax.device_put(x, NamedSharding(MESH, P("devices")))


def _model(seed=0):
    model = eqx.nn.MLP(4, 2, 8, 2, key=jax.random.PRNGKey(seed))
    return jtu.tree_map(lambda a: _rep(a) if eqx.is_array(a) else a, model)


def _map(f, tree):
    """`f` on each array of `tree` (an MLP's activations are leaves too)."""
    return jtu.tree_map(lambda a: f(a) if eqx.is_array(a) else a, tree)


def _arrays(tree) -> list:
    return jtu.tree_leaves(eqx.filter(tree, eqx.is_array))


def _items(tree) -> int:
    return len(_memo.flatten(tree)[0])


@jax.numpy_dtype_promotion("standard")  # optax mixes Python floats and int32 counts
def test_a_training_loop_matches_jax_jit_and_passes_its_modules_back_unflattened():
    opt = optax.adam(1e-2)
    xs = jax.random.normal(jax.random.PRNGKey(1), (8, 4, 4))
    ys = jax.random.normal(jax.random.PRNGKey(2), (8, 4, 2))

    def loss_fn(model, x, y):
        return jnp.mean((jax.vmap(model)(x) - y) ** 2)

    @ep.pmap2
    def step(model, opt_state, x, y):
        grads = jax.lax.pmean(eqx.filter_grad(loss_fn)(model, x, y), "devices")
        updates, opt_state = opt.update(
            grads, opt_state, eqx.filter(model, eqx.is_array)
        )
        return eqx.apply_updates(model, updates), opt_state

    @eqx.filter_jit
    def floor(model, opt_state, x, y):
        grads = eqx.filter_grad(loss_fn)(model, x.reshape(32, 4), y.reshape(32, 2))
        updates, opt_state = opt.update(
            grads, opt_state, eqx.filter(model, eqx.is_array)
        )
        return eqx.apply_updates(model, updates), opt_state

    model = _model()
    opt_state = _map(_rep, opt.init(eqx.filter(model, eqx.is_array)))
    ref = (model, opt_state)
    x, y = _split(xs), _split(ys)
    before = len(_memo._MEMO)
    for _ in range(6):
        model, opt_state = step(model, opt_state, x, y)
        ref = floor(*ref, xs, ys)
    assert len(_memo._MEMO) == before + 3  # this step's only: the rest died
    # The model, and Adam's two moments (modules of the model's structure), are items.
    assert _items((model, opt_state)) < len(jtu.tree_leaves((model, opt_state))) - 10
    # The first call's structure, and the loop's: model and moments as items.
    assert sorted(len(q._known) for q in step._quick.values()) == [0, 3]
    for a, b in zip(_arrays(model), _arrays(ref[0])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


class Box(eqx.Module):
    items: list
    scale: jax.Array


def test_a_module_holding_a_list_is_not_remembered_and_a_change_to_it_is_seen():
    step = ep.pmap2(lambda box, x: Box([box.items[0] + x, box.items[1]], box.scale))
    x = _split(jnp.ones((8, 3)))
    box = Box([_split(jnp.zeros((8, 3))), _rep(jnp.ones(2))], _rep(jnp.array(2.0)))
    box = step(step(box, x), x)
    assert id(box) not in _memo._MEMO
    box.items[0] = _split(jnp.full((8, 3), 100.0))  # the list changed in place
    out = step(box, x)
    np.testing.assert_allclose(out.items[0], np.full((8, 3), 101.0))


def test_a_remembered_module_is_forgotten_when_it_dies():
    step = ep.pmap2(lambda m, x: _map(lambda a: a + jnp.sum(x), m))
    x = _rep(jnp.ones(1))
    out = step(step(_model(), x), x)
    key = id(out)
    assert _memo._MEMO[key].ref() is out
    del out
    gc.collect()
    assert key not in _memo._MEMO


def test_a_remembered_module_in_containers_twice_and_in_another_function():
    grow = ep.pmap2(lambda m: _map(lambda a: a * 2.0, m))
    model = grow(grow(_model()))
    expected = _map(lambda a: a * 4.0, _model())

    @ep.pmap2
    def use(pair, x):
        return pair["a"](x) + pair["b"][1](x)

    x = _split(jnp.ones((8, 4)))
    outs = [use({"a": model, "b": [None, model]}, x) for _ in range(3)]
    out = outs[-1]
    want = 2 * expected(jnp.ones(4))
    np.testing.assert_allclose(out, np.broadcast_to(want, (8, 2)), rtol=1e-6)
    assert _items({"a": model, "b": [None, model]}) == 2


class Empty(eqx.Module):
    pass


class One(eqx.Module):
    w: jax.Array


def test_a_module_of_one_leaf_and_an_array_in_the_same_place():
    double = ep.pmap2(lambda t: _map(lambda a: a * 2.0, t))
    one = double(double(One(_rep(jnp.ones(3)))))  # remembered: one item, one leaf
    arr = _rep(jnp.ones(3))
    for _ in range(3):  # the same flat structure, one of each
        np.testing.assert_allclose(double(one).w, np.full(3, 8.0))
        np.testing.assert_allclose(double(arr), np.full(3, 2.0))
        np.testing.assert_allclose(double((one,))[0].w, np.full(3, 8.0))
        np.testing.assert_allclose(double((arr,))[0], np.full(3, 2.0))


def test_a_module_with_no_leaves_comes_back():
    step = ep.pmap2(lambda e, x: (Empty(), x + 1.0))
    e, x = Empty(), _split(jnp.zeros((8, 2)))
    for _ in range(4):
        e, x = step(e, x)
    assert id(e) in _memo._MEMO
    np.testing.assert_allclose(x, np.full((8, 2), 4.0))


def test_clear_caches_forgets_them_and_the_next_calls_are_right():
    grow = ep.pmap2(lambda m: _map(lambda a: a + 1.0, m))
    model = grow(grow(_model()))
    ep.clear_caches()
    assert id(model) not in _memo._MEMO
    for _ in range(3):
        model = grow(model)
    expected = _map(lambda a: a + 5.0, _model())
    for a, b in zip(_arrays(model), _arrays(expected)):
        np.testing.assert_allclose(a, b)


def test_threads_each_passing_back_their_own_model():
    grow = ep.pmap2(lambda m, k: _map(lambda a: a + k, m))
    results = {}

    # Each thread waits for its result: with several programs over the 8 CPU devices
    # in flight from different threads, XLA's CPU runtime can hang (plain `jax.jit` too,
    # JAX 0.10.2 and 0.12.1; not with one in flight per thread).
    def loop(seed):
        model, k = _model(seed), _rep(jnp.asarray(float(seed)))
        for _ in range(20):
            model = jax.block_until_ready(grow(model, k))
        results[seed] = model

    threads = [threading.Thread(target=loop, args=(s,)) for s in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for seed, model in results.items():
        expected = _map(lambda a: a + 20.0 * seed, _model(seed))
        for a, b in zip(_arrays(model), _arrays(expected)):
            np.testing.assert_allclose(a, b, rtol=1e-6)


def test_a_remembered_module_closed_over_inside_jax_jit():
    grow = ep.pmap2(lambda m: _map(lambda a: a * 3.0, m))
    model = grow(grow(_model()))
    apply = ep.pmap2(lambda m, x: m(x), in_axes=(None, 0))
    x = _split(jnp.ones((8, 4)))
    got = jax.jit(lambda x: apply(model, x))(x)
    want = _map(lambda a: a * 9.0, _model())(jnp.ones(4))
    np.testing.assert_allclose(got, np.broadcast_to(want, (8, 2)), rtol=1e-6)


def test_a_donated_module_passed_again_is_refused_by_path():
    step = ep.pmap2(lambda m: _map(lambda a: a + 1.0, m), donate="all")
    old = step(step(_model()))
    new = step(old)
    assert id(old) in _memo._MEMO
    with pytest.raises(ValueError, match="donated by an earlier call"):
        step(old)
    np.testing.assert_allclose(_arrays(new)[0], _arrays(_model())[0] + 3.0, rtol=1e-6)


def test_only_modules_whose_every_node_is_frozen_are_planned():
    model = _model()
    plan = _memo.plan_of(jtu.tree_structure((model, {"m": model}, [model], 1.0)))
    assert plan is not None and len(plan.at) == 3
    assert _memo.plan_of(jtu.tree_structure((1.0, {"a": 2.0}))) is None
    box = Box([jnp.ones(1)], jnp.ones(()))
    assert _memo.plan_of(jtu.tree_structure(box)) is None


def _nested(leaf, depth: int):
    for _ in range(depth):
        leaf = (leaf,)
    return leaf


def test_structures_nested_as_deep_as_jax_flattens_them():
    module = One(_rep(jnp.ones(2)))
    depth, structure = 0, jtu.tree_structure(module)
    while depth < 3000:  # as deep as `jax.tree_util` flattens from here
        try:
            structure = jtu.tree_structure(_nested(module, depth + 50))
        except (RecursionError, SystemError):
            break
        depth += 50
    assert depth > 300
    plan = _memo.plan_of(structure)  # deeper than it recurses: nothing remembered
    assert plan is None or plan.at[0][2:] == (0, 1)
    step = ep.pmap2(lambda t: _map(lambda a: a + 1.0, t))
    out = step(step(_nested(module, depth - 200)))  # a call adds frames
    np.testing.assert_allclose(jtu.tree_leaves(out)[0], np.full(2, 3.0))


class _BNNet(eqx.Module):
    linear: eqx.nn.Linear
    bn: eqx.nn.BatchNorm

    def __init__(self, key):
        self.linear = eqx.nn.Linear(3, 4, key=key)
        self.bn = eqx.nn.BatchNorm(4, axis_name=("batch", "devices"), mode="batch")

    def __call__(self, x, state):
        return self.bn(self.linear(x), state)


def _fresh(tree):
    """The same leaves in new objects: nothing in it was returned by a call."""
    return jtu.tree_map(lambda a: a, tree)


@jax.numpy_dtype_promotion("standard")  # optax mixes Python floats and int32 counts
def test_batch_norm_training_is_bitwise_the_same_with_and_without_remembered_modules():
    opt = optax.sgd(0.1)

    @ep.pmap2
    def step(model, state, opt_state, x):
        def loss(model, state):
            out, state = jax.vmap(
                model, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
            )(x, state)
            return jnp.mean(out**2), state

        (value, state), grads = eqx.filter_value_and_grad(loss, has_aux=True)(
            model, state
        )
        grads = jax.lax.pmean(grads, "devices")
        updates, opt_state = opt.update(grads, opt_state)
        return eqx.apply_updates(model, updates), state, opt_state, value

    model, state = ep.pmap2_new_states(
        eqx.nn.make_with_state(_BNNet),
        {"key": jax.random.key(0)},
        state_out_axes={0: OfType(eqx.nn.State), None: ...},
    )
    opt_state = _map(_rep, opt.init(eqx.filter(model, eqx.is_array)))
    xs = _split(jax.random.normal(jax.random.key(1), (8, 5, 3)))
    kept = (model, state, opt_state)
    fresh = (_fresh(model), _fresh(state), _fresh(opt_state))
    for _ in range(5):
        *kept, loss_kept = step(*kept, xs)
        *fresh, loss_fresh = step(*(_fresh(t) for t in fresh), xs)
        np.testing.assert_array_equal(loss_kept, loss_fresh)
    assert id(kept[0]) in _memo._MEMO
    for a, b in zip(jtu.tree_leaves(kept), jtu.tree_leaves(fresh)):
        if eqx.is_array(a):
            np.testing.assert_array_equal(a, b)
