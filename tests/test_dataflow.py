"""The dataflow pass (`_dataflow.varying_outputs`): which outputs of a jaxpr traced with
`jax.pmap`'s semantics may differ between the devices of a named axis."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import N
from jax import lax

from eqx_pmapstate import _dataflow
from eqx_pmapstate._dataflow import varying_outputs
from eqx_pmapstate._jax_compat import open_jaxpr, subjaxprs


AX = "devices"


def flags(f, *args, varying, env=((AX, N),), axis=AX):
    """The pass's flags for `f`'s outputs, with `varying[i]` saying whether argument
    `i` differs between devices."""
    closed = jax.make_jaxpr(f, axis_env=list(env))(*args)
    return varying_outputs(closed, list(varying), axis)


x3 = jnp.arange(3, dtype=jnp.float32)


def _idx():
    return lax.axis_index(AX).astype(jnp.float32)


# --------------------------------------------------------------------------- inputs


def test_mapped_input_varies():
    # A mapped input holds a different slice on each device.
    assert flags(lambda x: x * 2, x3, varying=[True]) == (True,)


def test_replicated_input_is_invariant():
    # A replicated input is an identical copy on each device (pmap's semantics).
    assert flags(lambda x: x * 2, x3, varying=[False]) == (False,)


def test_flags_follow_each_input():
    # Each output depends only on the inputs it is computed from.
    f = lambda a, b: (a + 1, b * 2, a * b)
    assert flags(f, x3, x3, varying=[True, False]) == (True, False, True)


def test_constant_is_invariant():
    # A closed-over array is a constant of the jaxpr: the same program everywhere.
    c = jnp.arange(3, dtype=jnp.float32) * 7
    assert flags(lambda x: (c, c + 1), x3, varying=[True]) == (False, False)


def test_literal_is_invariant():
    # A Python scalar becomes a literal (or a constant): the same on every device.
    assert flags(lambda x: (x, 1.0, jnp.float32(2)), x3, varying=[True]) == (
        True,
        False,
        False,
    )


def test_axis_index_varies():
    # axis_index is the device's own position along the axis.
    assert flags(lambda x: x + _idx(), x3, varying=[False]) == (True,)


def test_axis_index_of_another_axis_is_invariant_over_ours():
    # The position along another axis says nothing about ours.
    env = ((AX, N), ("other", 2))
    f = lambda x: x + lax.axis_index("other").astype(jnp.float32)
    assert flags(f, x3, varying=[False], env=env) == (False,)


# --------------------------------------------------------------------------- collectives


@pytest.mark.parametrize(
    "collective",
    [
        lambda v: lax.psum(v, AX),
        lambda v: lax.pmean(v, AX),
        lambda v: lax.pmax(v, AX),
        lambda v: lax.pmin(v, AX),
        lambda v: lax.all_gather(v, AX),
        lambda v: lax.all_gather(v, AX, tiled=True),
        lambda v: lax.psum(v, (AX, "other")),
    ],
    ids=["psum", "pmean", "pmax", "pmin", "all_gather", "all_gather_tiled", "psum2"],
)
def test_reducing_collective_makes_invariant(collective):
    # Every device ends with the same reduction of all devices' values.
    env = ((AX, N), ("other", 2))
    assert flags(collective, x3, varying=[True], env=env) == (False,)


def test_pbroadcast_makes_invariant():
    # Every device receives the source device's value.
    assert flags(lambda v: lax.pbroadcast(v, (AX,), 0), x3, varying=[True]) == (False,)


@pytest.mark.parametrize(
    "collective",
    [
        lambda v: lax.psum(v, "other"),
        lambda v: lax.pmean(v, "other"),
        lambda v: lax.pmax(v, "other"),
        lambda v: lax.all_gather(v, "other"),
    ],
    ids=["psum", "pmean", "pmax", "all_gather"],
)
def test_collective_over_another_axis_keeps_varying(collective):
    # Reducing over another axis leaves the differences along ours.
    env = ((AX, N), ("other", 2))
    assert flags(collective, x3, varying=[True], env=env) == (True,)


def test_axis_index_groups_keep_varying():
    # A grouped psum reduces within each group only: two groups get two values.
    groups = [[0, 1, 2, 3], [4, 5, 6, 7]]
    f = lambda v: lax.psum(v, AX, axis_index_groups=groups)
    assert flags(f, x3, varying=[True]) == (True,)


def test_ppermute_varies():
    # Each device receives another device's value.
    perm = [(i, (i + 1) % N) for i in range(N)]
    assert flags(lambda v: lax.ppermute(v, AX, perm), x3, varying=[False]) == (True,)


def test_all_to_all_varies():
    # Each device gets its own chunk of every device's value.
    v = jnp.ones((N, 2), jnp.float32)
    assert flags(lambda v: lax.all_to_all(v, AX, 0, 0), v, varying=[False]) == (True,)


def test_psum_scatter_varies():
    # Each device keeps its own slice of the sum.
    v = jnp.ones((N, 2), jnp.float32)
    assert flags(lambda v: lax.psum_scatter(v, AX), v, varying=[False]) == (True,)


# --------------------------------------------------------------------------- control flow


def _cond(p, x):
    return lax.cond(p > 0, lambda y: y + 1, lambda y: y * 2, x)


def test_cond_with_varying_predicate_varies():
    # Devices may take different branches, even with invariant operands.
    out = flags(_cond, jnp.float32(1), x3, varying=[True, False])
    assert out == (True,)


def test_cond_with_invariant_predicate_follows_branches():
    # Every device takes the same branch: the output varies only if an operand does.
    assert flags(_cond, jnp.float32(1), x3, varying=[False, False]) == (False,)
    assert flags(_cond, jnp.float32(1), x3, varying=[False, True]) == (True,)


def test_cond_branch_with_axis_index_varies():
    # One branch makes a value vary by itself: the output is the union of branches.
    f = lambda p, x: lax.cond(p > 0, lambda y: y + _idx(), lambda y: y, x)
    assert flags(f, jnp.float32(1), x3, varying=[False, False]) == (True,)


def test_cond_outputs_flagged_separately():
    # With an invariant predicate each output follows its own operands.
    f = lambda p, a, b: lax.cond(p > 0, lambda a, b: (a, b), lambda a, b: (a, b), a, b)
    assert flags(f, jnp.float32(1), x3, x3, varying=[False, True, False]) == (
        True,
        False,
    )


def test_switch_with_varying_index_varies():
    # lax.switch is a cond on an index: a varying index picks different branches.
    branches = [lambda y: y, lambda y: -y, lambda y: y * 2]
    f = lambda i, x: lax.switch(i, branches, x)
    assert flags(f, jnp.int32(0), x3, varying=[True, False]) == (True,)
    assert flags(f, jnp.int32(0), x3, varying=[False, False]) == (False,)


def test_while_with_varying_trip_count_varies():
    # The loop runs a different number of times per device: its carry differs too.
    def f(limit, x):
        body = lambda c: (c[0] + 1, c[1] * 2)
        return lax.while_loop(lambda c: c[0] < limit, body, (0, x))

    assert flags(f, jnp.int32(3), x3, varying=[True, False]) == (True, True)


def test_while_with_invariant_trip_count_follows_carry():
    # Same trip count everywhere: each carry varies only if it picks up variation.
    def f(limit, a, b):
        body = lambda c: (c[0] + 1, c[1] * 2, c[2] + 1)
        return lax.while_loop(lambda c: c[0] < limit, body, (0, a, b))

    assert flags(f, jnp.int32(3), x3, x3, varying=[False, True, False]) == (
        False,
        True,
        False,
    )


def test_while_carry_picks_up_variation_on_later_iterations():
    # The fixed point: `b` takes `a`'s varying value only from the second iteration.
    def f(a, b):
        body = lambda c: (c[0] + 1, c[2], c[3], c[3])
        return lax.while_loop(lambda c: c[0] < 3, body, (0, b, b, a))

    assert flags(f, x3, x3, varying=[True, False]) == (False, True, True, True)


def test_scan_with_varying_xs_varies_ys():
    # Each iteration's output is computed from that iteration's varying slice.
    xs = jnp.ones((4, 3), jnp.float32)
    f = lambda c, xs: lax.scan(lambda c, x: (c + 1, c * x), c, xs)
    assert flags(f, x3, xs, varying=[False, True]) == (False, True)


def test_scan_with_invariant_inputs_is_invariant():
    # Nothing varies in, nothing in the body makes it vary.
    xs = jnp.ones((4, 3), jnp.float32)
    f = lambda c, xs: lax.scan(lambda c, x: (c + x, c * x), c, xs)
    assert flags(f, x3, xs, varying=[False, False]) == (False, False)


def test_scan_body_with_axis_index_varies():
    # The body makes the carry vary by itself.
    xs = jnp.ones((4, 3), jnp.float32)
    f = lambda c, xs: lax.scan(lambda c, x: (c + _idx(), x), c, xs)
    assert flags(f, x3, xs, varying=[False, False]) == (True, False)


def test_fori_loop_varying_carry_varies():
    # A varying initial carry stays varying through the loop.
    f = lambda x: lax.fori_loop(0, 3, lambda i, c: c * 2, x)
    assert flags(f, x3, varying=[True]) == (True,)


def test_scan_carry_picks_up_variation_on_later_iterations():
    # Iteration 1 moves xs[0] (varying) into the carry and outputs the old, invariant
    # carry; from iteration 2 on, ys hold varying values: only the fixed point sees it.
    f = lambda c, xs: lax.scan(lambda c, x: (x, c), c, xs)
    assert flags(f, x3, jnp.ones((4, 3)), varying=[False, True]) == (True, True)


def test_fori_loop_carry_picks_up_variation_from_another_carry():
    # Carry 0 takes carry 1's varying value on the second iteration.
    f = lambda x, xs: lax.fori_loop(0, 4, lambda i, c: (c[1], xs[i]), (x, x))
    assert flags(f, x3, jnp.ones((4, 3)), varying=[False, True]) == (True, True)


def test_scan_keeps_an_untouched_carry_invariant():
    # Precision, not only soundness: a carry computed from invariant values only stays
    # invariant beside a varying one (on every JAX version, whatever the parameters).
    f = lambda c, xs: lax.scan(lambda c, x: ((c[0] + 1.0, c[1] + x), None), c, xs)[0]
    assert flags(f, (x3, x3), jnp.ones((4, 3)), varying=[False, False, True]) == (
        False,
        True,
    )


def test_reduce_with_its_own_computation_is_not_a_call():
    # `lax.reduce` has one sub-jaxpr of its own arity, but it is no call: its second
    # argument runs over the operand's elements, which vary.
    f = lambda a: lax.reduce(a, 0.0, lambda p, q: q, (0,))
    assert flags(f, x3, varying=[True]) == (True,)


# --------------------------------------------------------------------------- calls


def test_jit_inside_follows_its_body():
    # A nested jit is a call: each output follows its own inputs.
    g = jax.jit(lambda a, b: (a * 2, b + 1))
    assert flags(g, x3, x3, varying=[True, False]) == (True, False)


def test_jit_inside_with_psum_is_invariant():
    # A collective inside a nested jit is seen through the call.
    g = jax.jit(lambda a: lax.psum(a, AX))
    assert flags(g, x3, varying=[True]) == (False,)


def test_jit_inside_with_axis_index_varies():
    # A nested jit that reads axis_index makes its output vary.
    g = jax.jit(lambda a: a + _idx())
    assert flags(g, x3, varying=[False]) == (True,)


@jax.custom_jvp
def _cj(a, b):
    return a * 2, b + 1


@_cj.defjvp
def _cj_jvp(primals, tangents):
    return _cj(*primals), tangents


def test_custom_jvp_follows_its_body():
    # A custom_jvp function is called as its primal body.
    assert flags(_cj, x3, x3, varying=[True, False]) == (True, False)
    assert flags(_cj, x3, x3, varying=[False, False]) == (False, False)


@jax.custom_vjp
def _cv(a, b):
    return a * 2, b + 1


_cv.defvjp(lambda a, b: (_cv(a, b), None), lambda _, g: g)


def test_custom_vjp_follows_its_body():
    # A custom_vjp function is called as its primal body.
    assert flags(_cv, x3, x3, varying=[True, False]) == (True, False)
    assert flags(_cv, x3, x3, varying=[False, False]) == (False, False)


def test_checkpoint_follows_its_body():
    # jax.checkpoint (remat) is a call.
    g = jax.checkpoint(lambda a, b: (jnp.sin(a), b * 2))
    assert flags(g, x3, x3, varying=[True, False]) == (True, False)


def test_checkpoint_with_pmean_is_invariant():
    # A collective inside remat is seen through the call.
    g = jax.checkpoint(lambda a: lax.pmean(jnp.sin(a), AX))
    assert flags(g, x3, varying=[True]) == (False,)


# --------------------------------------------------------------------------- transformations


def _loss(w, data):
    return jnp.sum((data @ w) ** 2)


def test_grad_of_replicated_param_with_mapped_data_varies():
    # Each device's gradient is from its own data.
    w, data = jnp.ones(3, jnp.float32), jnp.ones((4, 3), jnp.float32)
    assert flags(jax.grad(_loss), w, data, varying=[False, True]) == (True,)


def test_pmean_of_grad_is_invariant():
    # The data-parallel idiom: averaging the gradients over the axis.
    w, data = jnp.ones(3, jnp.float32), jnp.ones((4, 3), jnp.float32)
    f = lambda w, d: lax.pmean(jax.grad(_loss)(w, d), AX)
    assert flags(f, w, data, varying=[False, True]) == (False,)


def test_grad_with_replicated_data_is_invariant():
    # The same data on every device gives the same gradient.
    w, data = jnp.ones(3, jnp.float32), jnp.ones((4, 3), jnp.float32)
    assert flags(jax.grad(_loss), w, data, varying=[False, False]) == (False,)


def test_collective_over_vmap_and_device_axes_is_invariant():
    # pmean over ("batch", "devices") inside vmap reduces over both: same everywhere.
    v = jnp.ones((4, 3), jnp.float32)
    f = jax.vmap(lambda v: lax.pmean(v, ("batch", AX)), axis_name="batch")
    assert flags(f, v, varying=[True]) == (False,)


def test_collective_over_vmap_axis_only_keeps_varying():
    # pmean over the vmap axis alone leaves the differences between devices.
    v = jnp.ones((4, 3), jnp.float32)
    f = jax.vmap(lambda v: lax.pmean(v, "batch"), axis_name="batch")
    assert flags(f, v, varying=[True]) == (True,)


# --------------------------------------------------------------------------- callbacks


def test_io_callback_varies():
    # A side-effecting callback may return something different on each device.
    from jax.experimental import io_callback

    shape = jax.ShapeDtypeStruct((3,), jnp.float32)
    f = lambda a: io_callback(lambda a: np.asarray(a), shape, a)
    assert flags(f, x3, varying=[False]) == (True,)


def test_pure_callback_follows_inputs():
    # A pure callback is a deterministic function of its inputs.
    shape = jax.ShapeDtypeStruct((3,), jnp.float32)
    f = lambda a: jax.pure_callback(lambda a: np.asarray(a), shape, a)
    assert flags(f, x3, varying=[False]) == (False,)
    assert flags(f, x3, varying=[True]) == (True,)


def test_x_minus_x_is_conservatively_varying():
    # The pass tracks dependence, not values: `x - x` depends on a varying x.
    assert flags(lambda a: a - a, x3, varying=[True]) == (True,)


# --------------------------------------------------------------------------- against reality


def _per_device(shape):
    """An input with a different slice per device."""
    n = int(np.prod(shape))
    return jnp.arange(N * n, dtype=jnp.float32).reshape((N, *shape)) / 7 + 1


_CASES = {
    "elementwise": lambda a, b: (a * 2, b + 1, a * b),
    "pmean": lambda a, b: (lax.pmean(a, AX), a + b),
    "pmax_pmin": lambda a, b: (lax.pmax(a, AX) - lax.pmin(a, AX), b),
    "all_gather": lambda a, b: (
        lax.all_gather(a, AX),
        lax.all_gather(a, AX, tiled=True),
    ),
    "axis_index": lambda a, b: (b + _idx(), lax.psum(b * _idx(), AX)),
    "grouped": lambda a, b: lax.psum(
        a, AX, axis_index_groups=[[0, 1, 2, 3], [4, 5, 6, 7]]
    ),
    "ppermute": lambda a, b: lax.ppermute(b, AX, [(i, (i + 1) % N) for i in range(N)]),
    "cond": lambda a, b: (
        lax.cond(a[0] > 2, lambda y: y + 1, lambda y: y * 2, b),
        lax.cond(b[0] > 0, lambda y: y + 1, lambda y: y * 2, b),
    ),
    "while": lambda a, b: lax.while_loop(
        lambda c: c[0] < a[0], lambda c: (c[0] + 1, c[1] * 2, c[2]), (0.0, b, b)
    ),
    "while_fixed_point": lambda a, b: lax.while_loop(
        lambda c: c[0] < 3, lambda c: (c[0] + 1, c[2], c[3], c[3]), (0, b, b, a)
    ),
    "switch": lambda a, b: lax.switch(
        (a[0] > 3).astype(jnp.int32), [lambda y: y + 1, lambda y: y * 2], b
    ),
    "scan": lambda a, b: lax.scan(lambda c, x: (c + x, x * 2), b, jnp.stack([a, b])),
    "pure_callback": lambda a, b: jax.pure_callback(
        lambda u, v: (np.asarray(u) * 2, np.asarray(v) + 1),
        (jax.ShapeDtypeStruct((3,), jnp.float32),) * 2,
        a,
        b,
    ),
    "grad": lambda a, b: (
        jax.grad(lambda w: jnp.sum((w * a) ** 2))(b),
        lax.pmean(jax.grad(lambda w: jnp.sum((w * a) ** 2))(b), AX),
    ),
    "jit_checkpoint": lambda a, b: (
        jax.jit(lambda u, v: lax.psum(u, AX) + v)(a, b),
        jax.checkpoint(lambda u: jnp.sin(u) * 2)(b),
    ),
    "vmap": lambda a, b: jax.vmap(
        lambda u: (lax.pmean(u, ("batch", AX)), lax.pmean(u, "batch")),
        axis_name="batch",
    )(jnp.stack([a, b])),
}


@pytest.mark.parametrize("name", list(_CASES))
@pytest.mark.parametrize("in_axes", [(0, None), (None, 0), (0, 0)])
def test_invariant_outputs_are_equal_on_every_device(name, in_axes):
    # Soundness: whatever the pass calls invariant is the same on every device when
    # the function runs under jax.pmap with inputs that differ per device.
    f = _CASES[name]
    a, b = _per_device((3,)), _per_device((3,))[::-1] * 3
    args = [x if ax == 0 else x[2] for x, ax in zip((a, b), in_axes)]
    local = [x[0] for x in (a, b)]
    out = flags(f, *local, varying=[ax == 0 for ax in in_axes])
    results = jax.tree.leaves(jax.pmap(f, AX, in_axes=in_axes)(*args))
    assert len(results) == len(out)
    for r, varies in zip(results, out):
        if not varies:
            np.testing.assert_array_equal(r, np.broadcast_to(r[:1], r.shape))


# --------------------------------------------------------------------------- this JAX


@jax.custom_jvp
def _custom_jvp_sin(x):
    return jnp.sin(x)


_custom_jvp_sin.defjvp(lambda p, t: (_custom_jvp_sin(p[0]), jnp.cos(p[0]) * t[0]))


@jax.custom_vjp
def _custom_vjp_double(x):
    return x * 2


_custom_vjp_double.defvjp(lambda x: (x * 2, None), lambda _, g: (g * 2,))


# What users write inside a step, on a replicated `w` and a mapped `x`: per construct,
# the function and whether its result is proved the same on every device.
CONSTRUCTS = {
    "jit": (lambda w, x: jax.jit(lambda a: a * 2)(w), False),
    "checkpoint": (lambda w, x: jax.checkpoint(lambda a: a + 1)(w), False),
    "custom_jvp": (lambda w, x: _custom_jvp_sin(w), False),
    "custom_vjp": (lambda w, x: _custom_vjp_double(w), False),
    "scan": (lambda w, x: lax.scan(lambda c, _: (c + w, None), w, None, 3)[0], False),
    "while": (lambda w, x: lax.fori_loop(0, 3, lambda i, c: c * w, w), False),
    "cond": (lambda w, x: lax.cond(w[0] > 0, lambda a: a, lambda a: -a, w), False),
    "psum": (lambda w, x: lax.psum(x, AX), False),
    "pmean": (lambda w, x: lax.pmean(x, AX), False),
    "pmax": (lambda w, x: lax.pmax(x, AX), False),
    "all_gather": (lambda w, x: lax.all_gather(x, AX), False),
    "pbroadcast": (lambda w, x: lax.pbroadcast(x, (AX,), 0), False),
    # jax.pmap's semantics: the gradient of a replicated input is this device's own.
    "grad of pmean": (
        lambda w, x: jax.grad(lambda w: jnp.sum(lax.pmean(w * x, AX)))(w),
        True,
    ),
    "pmean of grad": (
        lambda w, x: lax.pmean(jax.grad(lambda w: jnp.sum(w * x))(w), AX),
        False,
    ),
    "jit of psum": (lambda w, x: jax.jit(lambda a: lax.psum(a, AX))(x), False),
    "grad": (lambda w, x: jax.grad(lambda w: jnp.sum(w * x))(w), True),
    "psum_scatter": (
        lambda w, x: lax.psum_scatter(jnp.ones((N, 1)) * x[None], AX),
        True,
    ),
    "axis_index": (lambda w, x: w * _idx(), True),
    "jit of a mapped value": (lambda w, x: jax.jit(lambda a: a * 2)(x), True),
}
try:  # `to="invarying"` (JAX 0.12): an all_gather proved invariant
    jax.make_jaxpr(lambda x: lax.all_gather(x, AX, to="invarying"), axis_env=[(AX, N)])(
        x3
    )
    CONSTRUCTS["all_gather invarying"] = (
        lambda w, x: lax.all_gather(x, AX, to="invarying"),
        False,
    )
except (TypeError, AssertionError):  # not in this JAX, or not without varying types
    pass


def _equations(jaxpr):
    """Every equation of `jaxpr`, and of the jaxprs inside its equations."""
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in subjaxprs(eqn.params):
            yield from _equations(open_jaxpr(sub)[0])


@pytest.mark.parametrize("name", sorted(CONSTRUCTS))
def test_the_constructs_users_write_are_proved_on_this_jax(name):
    # Run by both CI jobs, so that a JAX release that renames a primitive the pass
    # relies on fails here (the pass would only become conservative, and refuse
    # correct steps), not in a user's step.
    f, varies = CONSTRUCTS[name]
    assert flags(f, x3, x3, varying=[False, True]) == (varies,)


def test_every_primitive_with_a_body_in_the_constructs_is_known_to_the_pass():
    known = _dataflow._CALLS | set(_dataflow._HIGHER_ORDER)
    for name, (f, _) in CONSTRUCTS.items():
        closed = jax.make_jaxpr(f, axis_env=[(AX, N)])(x3, x3)
        for eqn in _equations(closed.jaxpr):
            if subjaxprs(eqn.params):
                assert eqn.primitive.name in known, (name, eqn.primitive.name)


def test_reached_unreduced_follows_a_flagged_constant_and_stops_at_a_reduction():
    # `_zero` asks which outputs a value of the step (a constant of the traced update)
    # reaches without a reduction: here the first output, not the psum'd second.
    c = jnp.arange(3.0)

    def f(x, k):
        return x * c + k, k + lax.psum(x * c, AX)

    closed = jax.make_jaxpr(f, axis_env=[(AX, N)])(jnp.ones(3), jnp.float32(1))
    (n_consts,) = {len(closed.consts)}
    assert n_consts == 1
    reach = _dataflow.reached_unreduced
    assert reach(closed, [True], [False, False], AX) == (True, False)
    assert reach(closed, [False], [False, True], AX) == (True, True)
    assert reach(closed, [False], [True, False], AX) == (True, False)
    assert reach(closed, [False], [False, False], AX) == (False, False)
