"""Trains with `eqx_pmapstate.zero` for `tests/test_zero_multihost.py`: run on its own
(one process of 8 CPU devices) or by the launcher (2 processes of 4), it prints the
parameters' checksum and the optimizer state's bytes on one device."""

import os

import jax

import eqx_pmapstate as ep


if not ep.initialize_distributed():  # on its own: one process of 8 CPU devices
    jax.config.update("jax_platforms", os.environ.get("JAX_PLATFORMS", "cpu"))
    jax.config.update("jax_num_cpu_devices", 8)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402


PER_DEVICE_BATCH = 4
STEPS = 8
opt = ep.zero(optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(1e-2)))


def loss_fn(params, static, x, y):
    mlp = eqx.combine(params, static)
    return jnp.mean((jax.vmap(mlp)(x)[:, 0] - y) ** 2)


@ep.pmap2
def step(model, opt_state, x, y):
    params, static = eqx.partition(model, eqx.is_inexact_array)
    loss, grads = jax.value_and_grad(loss_fn)(params, static, x, y)
    updates, opt_state = opt.update(grads, opt_state, params)
    return eqx.apply_updates(model, updates), opt_state, jax.lax.pmean(loss, "devices")


def batch(i: int, n: int):
    """The global batch of step `i`, the same on every process."""
    rng = np.random.default_rng(i)
    x = rng.standard_normal((n, PER_DEVICE_BATCH, 3), dtype=np.float32)
    return x, np.tanh(x @ np.array([1.0, -0.5, 2.0], np.float32))


def main():
    n = jax.device_count()
    with jax.numpy_dtype_promotion("standard"):
        model = ep.pmap2_new_states(
            lambda key: eqx.nn.MLP(3, 1, 13, 2, key=key),
            {"key": jax.random.key(0)},
            state_out_axes={None: eqx.is_inexact_array},
        )
        opt_state = ep.pmap2(lambda m: opt.init(eqx.filter(m, eqx.is_inexact_array)))(
            model
        )
        for i in range(STEPS):
            model, opt_state, _ = step(model, opt_state, *batch(i, n))
    leaves = jax.tree.leaves(eqx.filter(model, eqx.is_array))
    local = [np.asarray(x.addressable_shards[0].data, np.float64) for x in leaves]
    total = sum(float(p.sum()) for p in local)
    squares = sum(float((p**2).sum()) for p in local)
    state_bytes = sum(
        s.data.nbytes
        for x in jax.tree.leaves(opt_state)
        for s in x.addressable_shards[:1]
    )
    print(f"checksum: {total!r} {squares!r}", flush=True)
    print(f"state bytes on one device: {state_bytes}", flush=True)


if __name__ == "__main__":
    main()
