"""Data-parallel training over several processes, with checkpoints to resume from.

Every process runs this same script. Each builds the model with `pmap2_new_states` (the
device axis spans the devices of every process), trains it for `--steps` steps with a
`pmap2` step and optax, saves a checkpoint every `--checkpoint-every` steps, and at the end
prints the parameters' checksum. The checksum is the same on every process, and the same
for two processes of 4 CPU devices as for one process of 8:

    python -m eqx_pmapstate.launch --processes 2 --local-devices 4 examples/multihost.py
    .venv/bin/python examples/multihost.py        # on its own: one process, 8 CPU devices

`--resume` continues from the newest checkpoint in `--checkpoint-dir`, so a run that
died (`--crash-at STEP` kills process `--crash-process` there, to try it) finishes with
the parameters an uninterrupted run would have had, to the bit. Without `--resume`, a run
starts afresh: it removes the checkpoints an earlier run left in `--checkpoint-dir`, and
says so. Only the newest `--keep` checkpoints are kept, as Orbax's `CheckpointManager`
keeps them, so the script can run again and again in the same folder.
"""

import argparse
import hashlib
import os
import pathlib
import re
import shutil
import signal

import jax

import eqx_pmapstate as ep


if not ep.initialize_distributed():  # on its own: one process of 8 CPU devices
    jax.config.update("jax_platforms", os.environ.get("JAX_PLATFORMS", "cpu"))
    jax.config.update("jax_num_cpu_devices", 8)

import equinox as eqx  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jaxtyping import Array, Int  # noqa: E402

from eqx_pmapstate import PerDevice  # noqa: E402
from eqx_pmapstate.filters import OfType  # noqa: E402


AXIS = "devices"
PER_DEVICE_BATCH = 8
optimizer = optax.adam(1e-2)


class Regressor(eqx.Module):
    mlp: eqx.nn.MLP
    seen: ep.ShortTermState[PerDevice[Int[Array, ""]]]  # samples each device trained on

    def __call__(self, x):
        return jax.vmap(self.mlp)(x)[:, 0]


def build(key):
    mlp = eqx.nn.MLP(4, 1, 32, 2, activation=jax.nn.tanh, key=key)
    return Regressor(mlp, ep.ShortTermState(jnp.zeros((), jnp.int32)))


def init(key):
    """The model (parameters replicated, `seen` per device) and the optimizer state."""
    model = ep.pmap2_new_states(
        build, {"key": key}, state_out_axes={0: OfType(ep.ShortTermState), None: ...}
    )
    params = eqx.filter(model.mlp, eqx.is_inexact_array)
    opt_state = ep.pmap2(optimizer.init, out_axes=None)(params)
    return model, opt_state


def batch(step: int, n: int):
    """The global batch of a step, the same on every process: `(n, per device, ...)`."""
    rng = np.random.default_rng(step)
    x = rng.standard_normal((n, PER_DEVICE_BATCH, 4), dtype=np.float32)
    y = np.sin(x @ np.array([1.0, -2.0, 0.5, 1.5], np.float32))
    return x, y


def loss_fn(mlp, x, y):
    return jnp.mean((jax.vmap(mlp)(x)[:, 0] - y) ** 2)


def mean_over_devices(tree):
    # The mean of every device's value, summed in device order: the same bits whatever
    # the processes (`jax.lax.pmean` adds in the order of the collective's algorithm,
    # which differs between one process and several).
    return jax.tree.map(lambda g: jax.lax.all_gather(g, AXIS).mean(0), tree)


@ep.pmap2
def step(model, opt_state, x, y):
    params, static = eqx.partition(model.mlp, eqx.is_inexact_array)
    loss, grads = jax.value_and_grad(lambda p: loss_fn(eqx.combine(p, static), x, y))(
        params
    )
    grads = mean_over_devices(grads)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    mlp = eqx.apply_updates(model.mlp, updates)
    seen = ep.ShortTermState(model.seen.value + x.shape[0])
    return Regressor(mlp, seen), opt_state, mean_over_devices(loss)


def local_value(x) -> np.ndarray:
    """A replicated array's value, read from this process's own copy."""
    return np.asarray(x.addressable_shards[0].data)


def checksum(model) -> tuple[float, str]:
    """The sum of the parameters, and a hash of their bits."""
    leaves = [
        local_value(p) for p in jax.tree.leaves(eqx.filter(model.mlp, eqx.is_array))
    ]
    digest = hashlib.sha256(b"".join(p.tobytes() for p in leaves)).hexdigest()
    return float(sum(p.astype(np.float64).sum() for p in leaves)), digest[:16]


def checkpoints(directory: pathlib.Path) -> list[tuple[int, pathlib.Path]]:
    """The complete checkpoints in `directory`, oldest first. (Orbax writes a step into a
    temporary folder and renames it when complete; those temporary folders are not
    listed.)"""
    steps = (re.fullmatch(r"step_(\d+)", p.name) for p in directory.glob("step_*"))
    return sorted((int(m[1]), directory / m[0]) for m in steps if m)


def remove(paths, why: str) -> None:
    """Process 0 removes `paths` (every process sees the same folder); the others wait
    until it has."""
    paths = list(paths)
    if paths and jax.process_index() == 0:
        print(f"{why}: removing {len(paths)} checkpoint(s)", flush=True)
        for path in paths:
            shutil.rmtree(path)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(why)


def start_afresh(directory: pathlib.Path) -> None:
    """A run without `--resume`: what an earlier run left is removed (all of `step_*`,
    unfinished ones included), so that the new run's checkpoints can be written."""
    remove(directory.glob("step_*"), f"a new run in {directory} (--resume continues)")


def prune(directory: pathlib.Path, keep: int) -> None:
    """Keeps the newest `keep` checkpoints."""
    old = [path for _, path in checkpoints(directory)[:-keep]]
    remove(old, f"keeping the newest {keep} in {directory}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--checkpoint-dir", default="checkpoints")
    parser.add_argument("--checkpoint-every", type=int, default=10)
    parser.add_argument("--keep", type=int, default=2, help="checkpoints kept")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--crash-at", type=int, default=None)
    parser.add_argument("--crash-process", type=int, default=1)
    args = parser.parse_args(argv)
    directory = pathlib.Path(args.checkpoint_dir)
    n, me = jax.device_count(), jax.process_index()

    model, opt_state = init(jax.random.key(0))
    start = 0
    if args.resume:
        found = checkpoints(directory)
    else:
        start_afresh(directory)
        found = []
    if found:
        start, path = found[-1]
        made = ep.describe((model, opt_state))
        model, opt_state = ep.load(path, (model, opt_state))
        same = ep.describe((model, opt_state)) == made
        print(f"resumed from step {start}, layout as made: {same}", flush=True)

    for i in range(start, args.steps):
        if args.crash_at == i and me == args.crash_process:
            print(f"process {me} dies at step {i}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        model, opt_state, loss = step(model, opt_state, *batch(i, n))
        if (i + 1) % args.checkpoint_every == 0:
            ep.save(directory / f"step_{i + 1}", (model, opt_state))
            prune(directory, args.keep)
        if me == 0 and (i + 1) % 5 == 0:
            print(f"step {i + 1}: loss {float(local_value(loss)):.4f}", flush=True)

    total, digest = checksum(model)
    print(f"checksum: {total!r} {digest}", flush=True)


if __name__ == "__main__":
    main()
