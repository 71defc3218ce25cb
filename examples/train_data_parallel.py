"""Data-parallel training of an MLP regression on 8 devices with `eqx_pmapstate` and optax.

The parameters and the optimizer state are replicated, each device gets its own shard of
every batch, gradients are averaged with `jax.lax.pmean`, and each device keeps a state of
its own across steps (how many samples it has seen). `pmap2` keeps every leaf where
`pmap2_new_states` put it, step after step, and proves when it traces the step that the
replicated parameters stay the same on every device.

Run: `.venv/bin/python examples/train_data_parallel.py` (on a machine with one CPU it
makes 8 CPU devices itself). `--plot PATH` also saves the curve of the loss per step as an
image (matplotlib, imported only then): the documentation's `docs/figures/loss.png` is
made with `--plot docs/figures/loss.png`.
"""

import argparse
import os

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Int

import eqx_pmapstate as ep
from eqx_pmapstate.filters import OfType


# 8 CPU devices where there is no accelerator, before JAX's first computation (a count
# given by the caller, JAX_NUM_CPU_DEVICES=4 for example, is kept).
if "JAX_NUM_CPU_DEVICES" not in os.environ:
    jax.config.update("jax_num_cpu_devices", 8)


AXIS = "devices"


class Regressor(eqx.Module):
    mlp: eqx.nn.MLP
    # Per device: how many samples this device has trained on.
    seen: ep.ShortTermState[ep.PerDevice[Int[Array, ""]]]

    def __call__(self, x):
        return jax.vmap(self.mlp)(x)[:, 0]


def build(key):
    return Regressor(
        eqx.nn.MLP(
            in_size=4,
            out_size=1,
            width_size=32,
            depth=2,
            activation=jax.nn.tanh,
            key=key,
        ),
        ep.ShortTermState(jnp.zeros((), jnp.int32)),
    )


TRUE_W = jnp.array([1.0, -2.0, 0.5, 1.5])


def make_data(key, n):
    x = jax.random.normal(key, (n, 4))
    return x, jnp.sin(x @ TRUE_W) + 0.1 * x[:, 0] ** 2


def loss_fn(params, static, x, y):
    model = eqx.combine(params, static)
    return jnp.mean((model(x) - y) ** 2)


def make_step(optimizer, average_gradients=True):
    @ep.pmap2(axis_name=AXIS)
    def step(model, opt_state, x, y):
        params, static = eqx.partition(model, eqx.is_inexact_array)
        loss, grads = jax.value_and_grad(loss_fn)(params, static, x, y)
        if average_gradients:
            grads = jax.lax.pmean(grads, AXIS)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        model = eqx.apply_updates(model, updates)
        model = eqx.tree_at(
            lambda m: m.seen.value, model, model.seen.value + x.shape[0]
        )
        return model, opt_state, jax.lax.pmean(loss, AXIS)

    return step


def init(key, n_devices):
    # Parameters replicated (axis None), the per-device counter along axis 0.
    model = ep.pmap2_new_states(
        build,
        {"key": key},
        state_out_axes={None: eqx.is_inexact_array, 0: OfType(ep.ShortTermState)},
    )
    assert model.seen.value.shape == (n_devices,)
    return model


def shard_batch(x, n_devices):
    return x.reshape(n_devices, x.shape[0] // n_devices, *x.shape[1:])


def train(steps=20, batch=256, lr=1e-2, seed=0, average_gradients=True, log=None):
    """Trains for `steps` steps; returns the model, the optimizer state and the losses."""
    n = jax.device_count()
    key_model, key_data = jax.random.split(jax.random.key(seed))
    model = init(key_model, n)
    optimizer = optax.adam(lr)
    opt_state = ep.pmap2(
        lambda m: optimizer.init(eqx.filter(m, eqx.is_inexact_array)), axis_name=AXIS
    )(model)
    step = make_step(optimizer, average_gradients)
    losses = []
    for i in range(steps):
        x, y = make_data(jax.random.fold_in(key_data, i), batch)
        model, opt_state, loss = step(
            model, opt_state, shard_batch(x, n), shard_batch(y, n)
        )
        losses.append(loss)
        if log is not None:
            log(i, loss)
    return model, opt_state, [float(v) for v in losses]


def plot_losses(losses, path, n_devices, batch):
    """Saves the curve of the loss per step to `path` (any format matplotlib writes)."""
    import matplotlib  # pyright: ignore[reportMissingImports]  (optional: only for --plot)

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt  # pyright: ignore[reportMissingImports]  (optional)
    from matplotlib.ticker import (  # pyright: ignore[reportMissingImports]  (optional)
        FormatStrFormatter,
        LogLocator,
        NullFormatter,
    )

    window = 10
    smooth = [
        sum(losses[max(0, i - window + 1) : i + 1]) / (i + 1 - max(0, i - window + 1))
        for i in range(len(losses))
    ]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100, layout="constrained")
    ax.plot(losses, color="tab:blue", alpha=0.35, linewidth=1, label="per step")
    ax.plot(smooth, color="tab:blue", linewidth=2, label=f"mean of the last {window}")
    ax.set_yscale("log")
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("step")
    ax.set_ylabel("loss (mean squared error)")
    ax.set_title(
        f"examples/train_data_parallel.py: {n_devices} devices, batch {batch} "
        f"({batch // n_devices} per device), Adam",
        fontsize=9,
    )
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description="Data-parallel training of an MLP regression on 8 devices."
    )
    parser.add_argument(
        "--plot",
        metavar="PATH",
        help="save the curve of the loss per step to PATH (needs matplotlib)",
    )
    args = parser.parse_args(argv)
    print(f"{jax.device_count()} devices")

    def log(i, loss):
        if i % 20 == 0 or i == 199:
            print(f"step {i:4d}  loss {float(loss):.5f}")

    batch = 256
    model, opt_state, losses = train(steps=200, batch=batch, log=log)
    print(ep.describe(model))
    print(
        f"loss {losses[0]:.4f} -> {losses[-1]:.4f}; samples seen per device: {model.seen.value.tolist()}"
    )
    if args.plot:
        plot_losses(losses, args.plot, jax.device_count(), batch)
        print(f"loss curve saved to {args.plot}")


if __name__ == "__main__":
    main()
