"""Trains with `eqx_pmapstate.zero` for `tests/test_zero_device_count.py`, on the number
of CPU devices given: `run STEPS [SAVE_AT DIR]` trains from the start (and saves the
model and the sharded optimizer state after step SAVE_AT), `resume DIR DONE STEPS` loads
that checkpoint into this device count (`per_device="regroup"`) and trains on to STEPS.
It prints the parameters' checksum."""

import os
import sys

import jax


jax.config.update("jax_platforms", os.environ.get("JAX_PLATFORMS", "cpu"))
jax.config.update("jax_num_cpu_devices", int(os.environ["ZERO_DEVICES"]))

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import eqx_pmapstate as ep  # noqa: E402


GLOBAL_BATCH = 24  # split evenly over 8, 4 or 3 devices
opt = ep.zero(optax.chain(optax.clip_by_global_norm(0.5), optax.adamw(1e-2)))


def loss_fn(params, static, x, y):
    mlp = eqx.combine(params, static)
    return jnp.mean((jax.vmap(mlp)(x)[:, 0] - y) ** 2)


@ep.pmap2
def step(model, opt_state, x, y):
    params, static = eqx.partition(model, eqx.is_inexact_array)
    grads = jax.grad(loss_fn)(params, static, x, y)
    updates, opt_state = opt.update(grads, opt_state, params)
    return eqx.apply_updates(model, updates), opt_state


def batch(i: int, n: int):
    """The global batch of step `i`, split over `n` devices."""
    rng = np.random.default_rng(i)
    x = rng.standard_normal((GLOBAL_BATCH, 3), dtype=np.float32)
    y = np.tanh(x @ np.array([1.0, -0.5, 2.0], np.float32))
    return x.reshape(n, -1, 3), y.reshape(n, -1)


def fresh():
    # 13 hidden units: parameter sizes that 8, 4 and 3 do not all divide (padding).
    model = ep.pmap2_new_states(
        lambda key: eqx.nn.MLP(3, 1, 13, 2, key=key),
        {"key": jax.random.key(0)},
        state_out_axes={None: eqx.is_inexact_array},
    )
    init = ep.pmap2(lambda m: opt.init(eqx.filter(m, eqx.is_inexact_array)))
    return model, init(model)


def train(model, opt_state, start: int, stop: int):
    n = jax.device_count()
    for i in range(start, stop):
        model, opt_state = step(model, opt_state, *batch(i, n))
    return model, opt_state


def checksum(model) -> list[float]:
    leaves = jax.tree.leaves(eqx.filter(model, eqx.is_array))
    return [float(np.asarray(x, np.float64).sum()) for x in leaves]


def main(mode, *args):
    with jax.numpy_dtype_promotion("standard"):
        if mode == "run":
            steps = int(args[0])
            model, opt_state = fresh()
            if len(args) > 1:
                model, opt_state = train(model, opt_state, 0, int(args[1]))
                for backend in ("orbax", "equinox"):
                    ep.save(f"{args[2]}/{backend}", (model, opt_state), backend=backend)
                model, opt_state = train(model, opt_state, int(args[1]), steps)
            else:
                model, opt_state = train(model, opt_state, 0, steps)
            print("RESULT", checksum(model))
            return
        directory, done, steps = args[0], int(args[1]), int(args[2])
        like = ep.abstract(fresh())
        for backend in ("orbax", "equinox"):
            try:
                ep.load(f"{directory}/{backend}", like)
                raise AssertionError("loaded into another device count unasked")
            except ValueError as e:  # per-device leaves: refused without a choice
                assert "per_device" in str(e), str(e)
            model, opt_state = ep.load(
                f"{directory}/{backend}", like, per_device="regroup"
            )
            assert ep.describe(opt_state) == ep.describe(fresh()[1])
            model, opt_state = train(model, opt_state, done, steps)
            print("RESULT", checksum(model))


if __name__ == "__main__":
    main(*sys.argv[1:])
