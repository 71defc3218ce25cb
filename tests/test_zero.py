"""`zero`: the optimizer state sharded over the devices, against `pmean` + the same optax
transformation (replicated state) over several steps."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_laid_out, N

import eqx_pmapstate as ep


STEPS = 6


@pytest.fixture(autouse=True)
def _standard_promotion():
    # optax mixes Python floats with int32 counters, which strict promotion refuses.
    with jax.numpy_dtype_promotion("standard"):
        yield


class Net(eqx.Module):
    mlp: eqx.nn.MLP
    scale: jax.Array  # a scalar parameter: one element, padded to one per device

    def __call__(self, x):
        return self.scale * jax.vmap(self.mlp)(x)


def make_model():
    # Sizes that are not multiples of 8: every parameter is padded.
    def build(key):
        return Net(eqx.nn.MLP(5, 3, 7, 2, key=key), jnp.array(1.5))

    return ep.pmap2_new_states(
        build, {"key": jax.random.key(0)}, state_out_axes={None: eqx.is_inexact_array}
    )


def loss_fn(params, static, x, y):
    return jnp.mean((eqx.combine(params, static)(x) - y) ** 2)


def batch(i):
    x = jax.random.normal(jax.random.key(i), (N, 4, 5))
    y = jax.random.normal(jax.random.key(1000 + i), (N, 4, 3))
    return x, y


def params_of(model):
    return eqx.filter(model, eqx.is_inexact_array)


def train_zero(tx, steps=STEPS, pmean_first=False):
    opt = ep.zero(tx)
    model = make_model()
    state = ep.pmap2(lambda m: opt.init(params_of(m)))(model)
    layouts = [ep.describe(state)]

    @ep.pmap2
    def step(model, opt_state, x, y):
        params, static = eqx.partition(model, eqx.is_inexact_array)
        loss, grads = jax.value_and_grad(loss_fn)(params, static, x, y)
        if pmean_first:
            grads = jax.lax.pmean(grads, "devices")
        updates, opt_state = opt.update(grads, opt_state, params)
        model = eqx.apply_updates(model, updates)
        return model, opt_state, jax.lax.pmean(loss, "devices")

    losses = []
    for i in range(steps):
        model, state, loss = step(model, state, *batch(i))
        layouts.append(ep.describe(state))
        losses.append(float(loss))
    return model, state, losses, layouts


def train_replicated(tx, steps=STEPS):
    model = make_model()
    state = ep.pmap2(lambda m: tx.init(params_of(m)))(model)

    @ep.pmap2
    def step(model, opt_state, x, y):
        params, static = eqx.partition(model, eqx.is_inexact_array)
        loss, grads = jax.value_and_grad(loss_fn)(params, static, x, y)
        grads = jax.lax.pmean(grads, "devices")
        updates, opt_state = tx.update(grads, opt_state, params)
        model = eqx.apply_updates(model, updates)
        return model, opt_state, jax.lax.pmean(loss, "devices")

    losses = []
    for i in range(steps):
        model, state, loss = step(model, state, *batch(i))
        losses.append(float(loss))
    return model, state, losses


def assert_same_params(a, b):
    for x, y in zip(
        jax.tree.leaves(params_of(a)), jax.tree.leaves(params_of(b)), strict=True
    ):
        assert_laid_out(x, None)  # the parameters stay replicated
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=2e-5, atol=1e-7)


def ndim_over_1(params):
    return jax.tree.map(lambda p: p.ndim > 1, params)


# The table of the tutorial (docs/tutorials/zero.md): each row against pmean + optax.
TABLE = {
    "sgd": lambda: optax.sgd(0.1),
    "momentum": lambda: optax.sgd(0.1, momentum=0.9, nesterov=True),
    "adam": lambda: optax.adam(1e-2),
    "adamw, mask by a callable": lambda: optax.adamw(
        1e-2, weight_decay=0.5, mask=ndim_over_1
    ),
    "adamw, mask as a pytree": lambda: optax.adamw(
        1e-2, weight_decay=0.5, mask=ndim_over_1(params_of(make_model()))
    ),
    "lion": lambda: optax.lion(1e-3, weight_decay=0.1),
    "rmsprop": lambda: optax.rmsprop(1e-2, momentum=0.5),
    "chain(clip_by_global_norm, adamw)": lambda: optax.chain(
        optax.clip_by_global_norm(0.05), optax.adamw(1e-2, mask=ndim_over_1)
    ),
    "MultiSteps(adam)": lambda: optax.MultiSteps(optax.adam(1e-2), every_k_schedule=3),
    "adam with a schedule": lambda: optax.adam(
        optax.warmup_cosine_decay_schedule(0.0, 1e-2, 2, STEPS)
    ),
    "inject_hyperparams(adamw)": lambda: optax.inject_hyperparams(optax.adamw)(
        learning_rate=optax.linear_schedule(1e-2, 1e-3, STEPS), weight_decay=0.1
    ),
    # Beyond the table: per-parameter norms (lamb), and factored moments (adafactor),
    # whose row and column means are computed on gathered values.
    "lamb": lambda: optax.lamb(1e-2),
    "adafactor": lambda: optax.adafactor(1e-2, min_dim_size_to_factor=4),
}


@pytest.mark.parametrize("name", list(TABLE))
def test_zero_trains_as_pmean_and_the_same_transformation(name):
    model, state, losses, layouts = train_zero(TABLE[name]())
    ref_model, ref_state, ref_losses = train_replicated(TABLE[name]())
    assert_same_params(model, ref_model)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    moved = jax.tree.map(lambda a, b: a - b, params_of(model), params_of(make_model()))
    assert float(optax.tree.norm(moved)) > 1e-4  # it trained
    # The layout of the state is kept from step to step.
    assert all(layout == layouts[0] for layout in layouts)
    # Same tree structure as the replicated state; leaves of a parameter's shape are
    # sliced (a device axis at 0), the rest replicated.
    assert jax.tree.structure(state) == jax.tree.structure(ref_state)
    for got, ref in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
        if ref.ndim == 0:
            assert_laid_out(got, None)
            np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=2e-5)
        else:
            assert_laid_out(got, 0)
            assert got.shape == (N, -(-ref.size // N))


def test_the_global_norm_is_over_every_device_and_ignores_padding():
    # With a max norm this small, every step is clipped: a norm over a slice alone (or
    # over padding) would scale the updates differently.
    clip = optax.chain(optax.clip_by_global_norm(1e-3), optax.sgd(1.0))
    model, *_ = train_zero(clip, steps=1)
    ref, *_ = train_replicated(clip, steps=1)
    assert_same_params(model, ref)
    moved = optax.tree.norm(
        jax.tree.map(lambda a, b: a - b, params_of(model), params_of(make_model()))
    )
    np.testing.assert_allclose(float(moved), 1e-3, rtol=1e-3)


def test_gradients_already_averaged_give_the_same_parameters():
    tx = optax.chain(optax.clip_by_global_norm(0.05), optax.adam(1e-2))
    model, *_ = train_zero(tx, steps=3, pmean_first=True)
    ref, *_ = train_replicated(tx, steps=3)
    assert_same_params(model, ref)


def test_each_device_holds_one_nth_of_the_state():
    model = make_model()
    state = ep.pmap2(lambda m: ep.zero(optax.adam(1e-3)).init(params_of(m)))(model)
    sizes = [p.size for p in jax.tree.leaves(params_of(model))]
    sliced = sum(-(-s // N) for s in sizes) * 4  # float32, padded
    expected = 2 * sliced + 4  # mu, nu, and the int32 count
    assert ep.describe(state).splitlines()[-1] == (
        f"{2 * len(sizes) + 1} array(s), {expected} bytes per device"
    )
    per_device = sum(
        x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(state)
    )
    assert per_device == expected
    replicated = ep.pmap2(lambda m: optax.adam(1e-3).init(params_of(m)))(model)
    whole = sum(
        x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(replicated)
    )
    assert whole == 2 * sum(sizes) * 4 + 4
    assert sliced <= sum(sizes) * 4 / N + 4 * len(sizes)  # 1/n, plus the padding
    # The count is replicated, the moments split; those of a scalar parameter (one
    # element) are kept whole.
    assert_laid_out(state[0].count, None)
    assert_laid_out(state[0].mu.mlp.layers[0].weight, 0)
    assert_laid_out(state[0].mu.scale, None)


@pytest.mark.parametrize("backend", ["orbax", "equinox"])
def test_the_state_round_trips_through_a_checkpoint(tmp_path, backend):
    model, state, *_ = train_zero(optax.adam(1e-2), steps=2)
    path = tmp_path / ("ckpt" if backend == "orbax" else "ckpt.eqx")
    ep.save(path, (model, state), backend=backend)
    loaded_model, loaded = ep.load(path, (model, state), backend=backend)
    assert ep.describe(loaded) == ep.describe(state)
    for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(state), strict=True):
        assert a.sharding == b.sharding
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert_same_params(loaded_model, model)


def test_a_loaded_state_trains_on_as_the_original():
    opt = ep.zero(optax.adam(1e-2))
    model, state, *_ = train_zero(optax.adam(1e-2), steps=2)
    like = (model, state)
    arrays, static = eqx.partition(like, eqx.is_array)
    # Through host memory, as a restart would, then back into the layout.
    on_host = jax.tree.map(np.asarray, arrays)
    restored = eqx.combine(ep.relayout(on_host, arrays), static)

    @ep.pmap2
    def step(model, opt_state, x, y):
        params, static = eqx.partition(model, eqx.is_inexact_array)
        grads = jax.grad(loss_fn)(params, static, x, y)
        updates, opt_state = opt.update(grads, opt_state, params)
        return eqx.apply_updates(model, updates), opt_state

    a, _ = step(*like, *batch(7))
    b, _ = step(*restored, *batch(7))
    assert_same_params(a, b)


def test_update_outside_a_mapped_function_is_an_error():
    opt = ep.zero(optax.adam(1e-2))
    params = {"w": jnp.ones(3)}
    with pytest.raises(ValueError, match=r"must be called inside a function mapped"):
        opt.init(params)


def test_a_state_of_the_plain_transformation_is_refused_naming_the_leaf():
    opt = ep.zero(optax.adam(1e-2))
    model = make_model()
    plain = ep.pmap2(lambda m: optax.adam(1e-2).init(params_of(m)))(model)

    @ep.pmap2
    def step(model, opt_state, x, y):
        params, static = eqx.partition(model, eqx.is_inexact_array)
        grads = jax.grad(loss_fn)(params, static, x, y)
        return opt.update(grads, opt_state, params)

    with pytest.raises(ValueError) as info:
        step(model, plain, *batch(0))
    message = str(info.value)
    assert "state[0].mu.mlp.layers[0].weight" in message
    assert "float32[7, 5] on each device" in message and "float32[5]" in message


def test_a_state_of_another_transformation_is_refused():
    model = make_model()
    sgd_state = ep.pmap2(lambda m: ep.zero(optax.sgd(0.1)).init(params_of(m)))(model)
    opt = ep.zero(optax.adam(1e-2))

    @ep.pmap2
    def step(model, opt_state, x, y):
        params, static = eqx.partition(model, eqx.is_inexact_array)
        grads = jax.grad(loss_fn)(params, static, x, y)
        return opt.update(grads, opt_state, params)

    with pytest.raises(ValueError, match="does not have the tree structure"):
        step(model, sgd_state, *batch(0))


def test_zero_needs_a_transformation():
    with pytest.raises(TypeError, match="wraps an optax `GradientTransformation`"):
        ep.zero(lambda g: g)  # pyright: ignore[reportArgumentType]
    with pytest.raises(TypeError, match="`axis_name` must be a non-empty str"):
        ep.zero(optax.sgd(0.1), axis_name="")


def test_another_axis_name():
    opt = ep.zero(optax.adam(1e-2), axis_name="batch")
    model = make_model()
    with pytest.raises(ValueError, match=r"axis 'batch'"):
        ep.pmap2(lambda m: opt.init(params_of(m)))(model)  # mapped over "devices"
    state = ep.pmap2(lambda m: opt.init(params_of(m)), axis_name="batch", in_axes=None)(
        model
    )
    ref = ep.pmap2(lambda m: ep.zero(optax.adam(1e-2)).init(params_of(m)))(model)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref), strict=True):
        assert a.shape == b.shape
        assert a.sharding.spec == jax.sharding.PartitionSpec(
            *(("batch",) if b.ndim else ())
        )


def test_params_may_be_left_out_and_extra_args_are_averaged_and_passed_on():
    # `reduce_on_plateau` reads the loss (an extra argument, given per device here), sgd
    # no parameters.
    def make():
        return optax.chain(
            optax.sgd(0.1),
            optax.contrib.reduce_on_plateau(
                factor=0.5, patience=0, accumulation_size=1
            ),
        )

    opt, ref = ep.zero(make()), make()

    def step_of(tx, average):
        @ep.pmap2
        def step(model, opt_state, x, y):
            params, static = eqx.partition(model, eqx.is_inexact_array)
            loss, grads = jax.value_and_grad(loss_fn)(params, static, x, y)
            if average:  # zero averages the loss as it does the gradients
                grads, loss = jax.lax.pmean((grads, loss), "devices")
            updates, opt_state = tx.update(grads, opt_state, value=loss)
            return eqx.apply_updates(model, updates), opt_state

        return step

    model = make_model()
    a = (model, ep.pmap2(lambda m: opt.init(params_of(m)))(model))
    b = (model, ep.pmap2(lambda m: ref.init(params_of(m)))(model))
    for i in range(5):
        a = step_of(opt, False)(*a, *batch(i))
        b = step_of(ref, True)(*b, *batch(i))
    assert_same_params(a[0], b[0])
    scale = a[1][1].scale
    assert_laid_out(scale, None)
    assert float(scale) == float(b[1][1].scale) < 1.0  # the plateau was reached


def test_reductions_over_whole_parameters_leave_the_padding_out():
    # Per parameter: a max whose padding (gradient 0) would win, a mean (the whole
    # size, not the slice's), a reshape and a squeeze that keep the slice, and a norm
    # that is a product (computed on the gathered whole value).
    def init(params):
        return optax.EmptyState()

    def update(updates, state, params=None):
        def one(g):
            top = jnp.max(-(g**2) - 1.0)  # < -1; the padding would give -1
            flat = jnp.squeeze(jnp.reshape(g, (1, -1)), 0)
            return top * (g - jnp.mean(flat)) / (1.0 + jnp.vdot(flat, flat))

        return jax.tree.map(one, updates), state

    tx = optax.chain(
        optax.GradientTransformation(init, update),
        optax.sgd(0.1),
    )
    model, *_ = train_zero(tx, steps=3)
    ref, *_ = train_replicated(tx, steps=3)
    assert_same_params(model, ref)


def test_a_zero_size_parameter_is_kept_replicated():
    # Its slices and state are zero-size, and so no element differs between devices.
    params = ep.pmap2_new_states(
        lambda: {"w": jnp.ones(3), "c": jnp.zeros((0,))}, state_out_axes={None: ...}
    )
    x = jnp.arange(8.0 * 3).reshape(8, 3)
    tx, z = optax.adam(1e-2), ep.zero(optax.adam(1e-2))

    def loss(p, x):
        return jnp.sum(p["w"] * x) + jnp.sum(p["c"])

    @ep.pmap2
    def plain(p, s, x):
        g = jax.lax.pmean(jax.grad(loss)(p, x), "devices")
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s

    @ep.pmap2
    def sharded(p, s, x):
        u, s = z.update(jax.grad(loss)(p, x), s, p)
        return optax.apply_updates(p, u), s

    want, _ = plain(params, ep.pmap2(tx.init)(params), x)
    got, state = sharded(params, ep.pmap2(z.init)(params), x)
    np.testing.assert_allclose(np.asarray(got["w"]), np.asarray(want["w"]), rtol=1e-6)
    assert got["c"].shape == (0,)
    assert_laid_out(got["w"], None)
    assert_laid_out(got["c"], None)


def test_a_zero_size_parameter_in_an_operation_on_whole_values():
    # lars scales each update by the ratio of two norms, which is applied on gathered
    # values: a zero-size parameter has nothing to gather (XLA refused the all-gather).
    params = ep.pmap2_new_states(
        lambda: {"w": jnp.arange(1.0, 4.0), "c": jnp.zeros((0, 4))},
        state_out_axes={None: ...},
    )
    tx, z = optax.lars(0.1), ep.zero(optax.lars(0.1))

    @ep.pmap2
    def plain(p, s):
        u, s = tx.update(jax.tree.map(jnp.ones_like, p), s, p)
        return optax.apply_updates(p, u), s

    @ep.pmap2
    def sharded(p, s):
        u, s = z.update(jax.tree.map(jnp.ones_like, p), s, p)
        return optax.apply_updates(p, u), s

    want, _ = plain(params, ep.pmap2(tx.init)(params))
    got, _ = sharded(params, ep.pmap2(z.init)(params))
    np.testing.assert_allclose(np.asarray(got["w"]), np.asarray(want["w"]), rtol=1e-6)
    assert got["c"].shape == (0, 4)


def test_a_parameter_that_changes_dtype_keeps_the_state_dtype_as_optax_does():
    # inject_hyperparams makes float32 updates for a bfloat16 parameter, which
    # `eqx.apply_updates` makes float32; the state stays as `init` made it (bfloat16),
    # as without `zero`. The state was refused on the second step.
    def build():
        return {"w": jnp.linspace(-1.0, 1.0, 11).astype(jnp.bfloat16), "b": jnp.ones(3)}

    def loss(p, x):
        return jnp.mean((x * p["w"][:3].astype(jnp.float32) + p["b"]) ** 2)

    def make():
        return optax.inject_hyperparams(optax.adam)(learning_rate=1e-2)

    def train(tx, sharded):
        p = ep.pmap2_new_states(build, state_out_axes={None: ...})
        s = ep.pmap2(tx.init)(p)

        @ep.pmap2
        def step(p, s, x):
            g = jax.grad(loss)(p, x)
            if not sharded:
                g = jax.lax.pmean(g, "devices")
            u, s = tx.update(g, s, p)
            return eqx.apply_updates(p, u), s

        for i in range(3):
            p, s = step(p, s, jax.random.normal(jax.random.key(i), (N, 3)))
        return p, s

    got, state = train(ep.zero(make()), True)
    want, ref_state = train(make(), False)
    assert got["w"].dtype == want["w"].dtype == jnp.float32
    assert state.inner_state[0].nu["w"].dtype == jnp.bfloat16
    assert ref_state.inner_state[0].nu["w"].dtype == jnp.bfloat16
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5)


def test_a_function_extra_argument_returns_its_mean_over_the_devices():
    # The `value_fn` of a line search, of this device's batch: passed on (it was given
    # to `jax.make_jaxpr` as an array), and its loss averaged as the gradients are.
    def make():
        return optax.chain(
            optax.sgd(5.0),
            optax.scale_by_backtracking_linesearch(max_backtracking_steps=8),
        )

    opt, tx = ep.zero(make()), make()

    def step_of(transform, sharded):
        @ep.pmap2
        def step(model, opt_state, x, y):
            params, static = eqx.partition(model, eqx.is_inexact_array)

            def value_fn(p):
                loss = loss_fn(p, static, x, y)
                return loss if sharded else jax.lax.pmean(loss, "devices")

            value, grads = jax.value_and_grad(value_fn)(params)
            if not sharded:
                grads = jax.lax.pmean(grads, "devices")
            updates, opt_state = transform.update(
                grads, opt_state, params, value=value, grad=grads, value_fn=value_fn
            )
            return eqx.apply_updates(model, updates), opt_state

        return step

    model = make_model()
    a = (model, ep.pmap2(lambda m: opt.init(params_of(m)))(model))
    b = (model, ep.pmap2(lambda m: tx.init(params_of(m)))(model))
    for i in range(3):
        a = step_of(opt, True)(*a, *batch(i))
        b = step_of(tx, False)(*b, *batch(i))
    assert_same_params(a[0], b[0])
    assert float(a[1][1].learning_rate) == float(b[1][1].learning_rate) < 1.0


def test_a_value_that_differs_between_devices_in_the_transformation_is_refused():
    # A learning rate from this device's loss (not averaged) scales each device's
    # slices differently; gathered, the updates looked replicated and the parameters
    # silently mixed the devices' rates. As without `zero`, it is a ReplicationError.
    params = ep.pmap2_new_states(
        lambda: {"w": jnp.arange(16.0)}, state_out_axes={None: ...}
    )
    x = jnp.arange(8.0)[:, None] * jnp.ones((8, 16))
    state = ep.pmap2(ep.zero(optax.sgd(0.1)).init)(params)

    def step(p, s, x):
        opt = ep.zero(optax.sgd(0.01 * (1.0 + jnp.mean(x))))  # this device's rate
        u, s = opt.update(jax.tree.map(jnp.ones_like, p), s, p)
        return optax.apply_updates(p, u), s

    with pytest.raises(ep.ReplicationError, match=r"output\[0\]\['w'\]"):
        ep.pmap2(step)(params, state, x)


def test_a_value_of_the_step_averaged_before_the_transformation_uses_it_is_accepted():
    # The same learning rate, averaged over the devices first: the same on every
    # device, so the updates are replicated and equal those of pmean + plain sgd.
    params = ep.pmap2_new_states(
        lambda: {"w": jnp.arange(16.0)}, state_out_axes={None: ...}
    )
    x = jnp.arange(8.0)[:, None] * jnp.ones((8, 16))

    def step_of(sharded):
        def step(p, s, x):
            lr = 0.01 * (1.0 + jax.lax.pmean(jnp.mean(x), "devices"))
            g = jax.tree.map(lambda w: w * jnp.mean(x), p)
            if sharded:
                u, s = ep.zero(optax.sgd(lr)).update(g, s, p)
            else:
                u, s = optax.sgd(lr).update(jax.lax.pmean(g, "devices"), s, p)
            return optax.apply_updates(p, u), s

        return ep.pmap2(step)

    got, _ = step_of(True)(params, ep.pmap2(ep.zero(optax.sgd(0.1)).init)(params), x)
    want, _ = step_of(False)(params, ep.pmap2(optax.sgd(0.1).init)(params), x)
    np.testing.assert_allclose(np.asarray(got["w"]), np.asarray(want["w"]), rtol=1e-6)
    assert not np.allclose(np.asarray(got["w"]), np.asarray(params["w"]))
