"""Draws `docs/figures/zero_memory.png`: the optimizer state's bytes on one device, and
the compiled training step's memory on one device, against the number of devices (1, 2,
4, 8), for `optax.adam` replicated (`pmean` of the gradients) and for
`eqx_pmapstate.zero(optax.adam(...))`.

Every number is measured: the model (the `large` MLP of `benchmarks/bench_train.py`,
797,185 parameters) and both optimizer states are made on a mesh of the first n of 8 CPU
devices, the state's bytes are those its first device holds, and the step's memory is
XLA's `memory_analysis()` of the compiled step (arguments + outputs + temporaries). The
numbers are printed and written to `benchmarks/results/zero_memory_cpu.json`, from which
the figure is drawn.

Run from the repository root with a Python that has the library and optax (measures, and
draws when matplotlib is there), or with `--from-json` (draws only: matplotlib alone):

    .venv/bin/python docs/scripts/zero_figure.py
    .venv-docs/bin/python docs/scripts/zero_figure.py --from-json
"""

import json
import os
import pathlib
import sys


os.environ.setdefault("JAX_PLATFORMS", "cpu")


ROOT = pathlib.Path(__file__).resolve().parents[2]
OUT = ROOT / "docs" / "figures" / "zero_memory.png"
RESULTS = ROOT / "benchmarks" / "results" / "zero_memory_cpu.json"
MLP = dict(in_size=16, out_size=1, width_size=512, depth=4)
BATCH = 256
COUNTS = (1, 2, 4, 8)


def mse(model, x, y):
    import jax
    import jax.numpy as jnp

    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def make_step(opt, sharded: bool):
    import equinox as eqx
    import jax

    def step(model, opt_state, x, y):
        loss, grads = eqx.filter_value_and_grad(mse)(model, x, y)
        if not sharded:
            grads = jax.lax.pmean(grads, "devices")
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, opt_state = opt.update(grads, opt_state, params)
        return (
            eqx.apply_updates(model, updates),
            opt_state,
            jax.lax.pmean(loss, "devices"),
        )

    return step


def first_device_bytes(tree) -> int:
    import jax

    device = jax.devices()[0]
    return sum(
        s.data.nbytes
        for x in jax.tree.leaves(tree)
        for s in x.addressable_shards
        if s.device == device
    )


def measure(n: int, sharded: bool) -> tuple[int, int]:
    import equinox as eqx
    import jax
    import numpy as np
    import optax

    import eqx_pmapstate as ep

    devices = jax.devices()[:n]
    model = ep.pmap2_new_states(
        lambda key: eqx.nn.MLP(**MLP, activation=jax.nn.relu, key=key),
        {"key": jax.random.key(0)},
        state_out_axes={None: eqx.is_inexact_array},
        devices=devices,
    )
    adam = optax.adam(1e-3)
    opt = ep.zero(adam) if sharded else adam
    params = eqx.filter(model, eqx.is_inexact_array)
    opt_state = ep.pmap2(lambda p: opt.init(p))(params)
    mesh = jax.tree.leaves(params)[0].sharding.mesh
    data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("devices"))
    x = jax.device_put(np.ones((n, BATCH // n, MLP["in_size"]), np.float32), data)
    y = jax.device_put(np.ones((n, BATCH // n, MLP["out_size"]), np.float32), data)
    step = ep.pmap2(make_step(opt, sharded))
    stats = step.lower(model, opt_state, x, y).compile().executable.memory_analysis()
    total = (
        stats.argument_size_in_bytes
        + stats.output_size_in_bytes
        + stats.temp_size_in_bytes
    )
    return first_device_bytes(opt_state), total


def measure_all() -> dict:
    import jax

    jax.config.update("jax_num_cpu_devices", max(COUNTS))  # before any JAX computation
    with jax.numpy_dtype_promotion("standard"):
        got = {
            (n, sharded): measure(n, sharded)
            for n in COUNTS
            for sharded in (False, True)
        }
    results = {
        "source": "measured: written by docs/scripts/zero_figure.py",
        "jax": jax.__version__,
        "mlp": MLP,
        "batch": BATCH,
        "devices": list(COUNTS),
    }
    for sharded, name in ((False, "replicated"), (True, "zero")):
        results[name] = {
            "state_bytes_per_device": [got[(n, sharded)][0] for n in COUNTS],
            "step_bytes_per_device": [got[(n, sharded)][1] for n in COUNTS],
        }
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    return results


def draw(results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mib = 2**20
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    titles = ("Optimizer state on one device", "Compiled step on one device")
    keys = ("state_bytes_per_device", "step_bytes_per_device")
    for ax, title, key in zip(axes, titles, keys):
        for name, label, marker in (
            ("replicated", "pmean + optax.adam", "o"),
            ("zero", "zero(optax.adam)", "s"),
        ):
            ys = [b / mib for b in results[name][key]]
            ax.plot(COUNTS, ys, marker=marker, label=label)
        ax.set_xscale("log", base=2)
        ax.set_xticks(COUNTS, [str(n) for n in COUNTS])
        ax.set_xlabel("devices")
        ax.set_ylabel("MiB")
        ax.set_ylim(bottom=0)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle("Adam on an MLP of 797,185 parameters (8 CPU devices, measured)")
    fig.tight_layout()
    fig.savefig(OUT, dpi=120)
    print(f"written {OUT}")


def main(argv) -> None:
    if "--from-json" in argv:
        results = json.loads(RESULTS.read_text())
    else:
        results = measure_all()
    mib = 2**20
    print("devices  state replicated  state zero  step replicated  step zero  (MiB)")
    rep, zero = results["replicated"], results["zero"]
    for k, n in enumerate(COUNTS):
        print(
            f"{n:7d}  {rep['state_bytes_per_device'][k] / mib:16.3f}  "
            f"{zero['state_bytes_per_device'][k] / mib:10.3f}  "
            f"{rep['step_bytes_per_device'][k] / mib:15.3f}  "
            f"{zero['step_bytes_per_device'][k] / mib:9.3f}"
        )
    try:
        draw(results)
    except ImportError:
        print("matplotlib is not installed: no figure drawn (see --from-json).")


if __name__ == "__main__":
    main(sys.argv[1:])
