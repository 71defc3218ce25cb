"""Benchmark: a real data-parallel training step (an MLP, optax Adam, mean squared error)
through `eqx_pmapstate.pmap2`, against the hand-written `jax.jit` floor.

How to run:

    .venv/bin/python benchmarks/bench_train.py            # 8 CPU devices, both sizes (5-7 min, 2 cores)
    .venv/bin/python benchmarks/bench_train.py --quick    # a smoke run (under 1 min, 2 cores)
    .venv/bin/python benchmarks/bench_train.py --gpu      # the accelerators there are (1 GPU: a 1-device mesh)
    .venv/bin/python benchmarks/bench_train.py --sizes large --rounds 60 --first-call-rounds 20
    .venv/bin/python benchmarks/bench_train.py --json benchmarks/results/bench_train_cpu.json
    .venv/bin/python benchmarks/bench_train.py --devices 1 --sizes tiny small --batch 8

The model is an `eqx.nn.MLP` of one of three sizes (`tiny`, 162 parameters, `small`,
about 9k, and `large`, about 800k; the exact counts are printed; the default runs
`small` and `large`), trained with `optax.adam` on a mean
squared error. Parameters and optimizer state are replicated over a one-dimensional mesh
named "devices", the batch (`--batch` samples in all) is split over the devices, and the
gradients are averaged across devices. No variant donates its inputs. Four variants
compute the same update:

- `jax.jit (floor)`: the step written for global arrays (the mean loss over the whole
  batch; no `pmean`, since `jax.jit` partitions sharded inputs by itself), jitted over the
  array pytree only (the model split once with `eqx.partition` outside); replicated
  params, the batch `(batch, features)` laid out with `P("devices")`. All ratios are to it.
- `eqx.filter_jit`: the same global step through Equinox's filtered jit, on the whole model.
- `eqx.filter_pmap`: the per-device step (`pmean` of gradients and loss), with
  `in_axes=(None, None, 0, 0)` and `out_axes=None` for model and optimizer state. (NOTES.md:
  `jax.pmap(out_axes=None)` is silently wrong on a value that differs per device; here
  every such output is computed from `pmean`'d values, so it is right.)
- `pmap2`: `eqx_pmapstate.pmap2` with its defaults on the same per-device step; the batch
  laid out as `(n_devices, batch / n_devices, features)` with `P("devices")`.

Before timing, every variant runs `--check-steps` steps from the same init and its
parameters are compared with the floor's: the largest absolute difference is printed, and
one beyond the tolerance (5% of a learning rate per step; float32 reordering gives ~1e-8,
a wrong update ~1e-3), or a parameter that does not stay replicated, fails the variant.
Then:

- per step: the loop a user writes, `model, opt_state, loss = step(model, opt_state, x,
  y)`, `--steps-per-round` steps then `jax.block_until_ready`; the variants take turns
  round by round (`--rounds` rounds) and the figure is the median over rounds of the time
  per step (the spread is the interquartile range over the median);
- first call: tracing, compiling and running the first step until `block_until_ready`,
  each in a fresh Python process (this script re-invokes itself with `--variant NAME
  --size NAME` and reads one JSON line from the child), `--first-call-rounds` processes per
  variant and size, interleaved; medians of wall time and of the child's CPU time (all its
  threads; on a small shared machine it is less disturbed by other processes);
- traces: how many times the user's step function was traced during the first call (a
  counter in the step's body), and how many more times the second call traced it.

A variant that fails (for example an error from `eqx_pmapstate`) is a row `FAILED: ...`
(its full message below the table), the rest of the benchmark goes on, and the script
exits with status 1 at the end.

`--json PATH` also writes the results (the machine, the settings, and per size and
variant the medians, ratios to the floor, trace counts and errors) as JSON, for
`benchmarks/plot_results.py`.

Targets: `pmap2` at most 1.05x the floor per step and at most 1.3x the floor's first call,
at both sizes, and faster per step than `eqx.filter_pmap`.

`--zero` measures instead the optimizer state sharded over the devices
(`eqx_pmapstate.zero(optax.adam(...))`, no `pmean`) against `pmean` + the same
`optax.adam` with a replicated state, both as `pmap2` steps, at the sizes given (`small`,
`large`, and `67m`: about 67M parameters, whose two variants run one after the other,
as both at once need more than 23 GB of host memory for 8 CPU devices): the optimizer
state's bytes on one device, the compiled step's memory on one
device from XLA (`memory_analysis()` of `Pmap2.lower(...).compile()`: arguments, outputs,
temporaries, and their sum), and the median time per step over `--rounds` interleaved
rounds, after checking that both reach the same parameters. Targets: the state per device
at most 1/n of the replicated one plus the padding; the compiled step's total lower by
at least the state saved; the step at most 1.05x the replicated one's:

    .venv/bin/python benchmarks/bench_train.py --zero --sizes small large --json benchmarks/results/bench_zero_cpu.json
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from collections.abc import Callable
from typing import NamedTuple

import _harness


SCRIPT = "benchmarks/bench_train.py"
AXIS = "devices"
STEP_TARGET = 1.05
FIRST_CALL_TARGET = 1.3
LEARNING_RATE = 1e-3
SIZES = {  # eqx.nn.MLP arguments
    "tiny": dict(in_size=8, out_size=2, width_size=8, depth=2),  # 162 params
    "small": dict(in_size=16, out_size=1, width_size=64, depth=3),  # 9,473 params
    "large": dict(in_size=16, out_size=1, width_size=512, depth=4),  # 797,185 params
}
ZERO_SIZES = {  # `--zero` only: too slow for the first-call measurements
    "67m": dict(in_size=16, out_size=1, width_size=4096, depth=5),  # 67,198,977 params
}
FLOOR = "jax.jit (floor)"
VARIANTS = (FLOOR, "eqx.filter_jit", "eqx.filter_pmap", "pmap2")
QUICK = dict(rounds=5, steps_per_round=3, first_call_rounds=1)
DEFAULTS = dict(rounds=30, steps_per_round=10, first_call_rounds=12)

_harness.use_devices(*_harness.platform_from_argv(sys.argv[1:]))  # before JAX starts

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402


# --------------------------------------------------------------------------- the problem


class Problem(NamedTuple):
    """One size's initial model and optimizer state (replicated), and its batch, both as
    `(batch, features)` and as `(n_devices, batch / n_devices, features)`."""

    model: eqx.nn.MLP
    opt_state: tuple
    optimizer: optax.GradientTransformation
    x: jax.Array
    y: jax.Array
    x_dev: jax.Array
    y_dev: jax.Array


def make_mesh():
    n = jax.device_count()
    return jax.make_mesh((n,), (AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicate(tree, mesh):
    arrays, static = eqx.partition(tree, eqx.is_array)
    return eqx.combine(jax.device_put(arrays, NamedSharding(mesh, P())), static)


def _mlp(kw: dict, key) -> eqx.nn.MLP:
    """The benchmark's MLP of the sizes `kw` (one of `SIZES`)."""
    return eqx.nn.MLP(
        kw["in_size"],
        kw["out_size"],
        kw["width_size"],
        kw["depth"],
        activation=jax.nn.relu,
        key=key,
    )


def make_problem(size: str, batch: int) -> Problem:
    mesh = make_mesh()
    n = mesh.size
    if batch % n:
        raise SystemExit(f"--batch {batch} is not a multiple of the {n} devices.")
    kw = SIZES[size]
    model = _mlp(kw, jax.random.key(0))
    optimizer = optax.adam(LEARNING_RATE)
    opt_state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, kw["in_size"]), dtype=np.float32)
    y = np.sin(x[:, : kw["out_size"]]) + 0.1 * x[:, -kw["out_size"] :] ** 2
    per = NamedSharding(mesh, P(AXIS))
    return Problem(
        model=replicate(model, mesh),
        opt_state=replicate(opt_state, mesh),
        optimizer=optimizer,
        x=jax.device_put(x, per),
        y=jax.device_put(y, per),
        x_dev=jax.device_put(x.reshape(n, batch // n, -1), per),
        y_dev=jax.device_put(y.reshape(n, batch // n, -1), per),
    )


def n_params(model) -> int:
    return sum(a.size for a in jax.tree.leaves(eqx.filter(model, eqx.is_array)))


# --------------------------------------------------------------------------- the steps


def mse(model, x, y):
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def make_model_step(optimizer, counter: list, axis_name: str | None):
    """The step a user writes on the whole model: per device with `pmean`s (`axis_name`
    given), or on global arrays (`axis_name=None`). `counter[0]` counts its traces."""

    def step(model, opt_state, x, y):
        counter[0] += 1
        loss, grads = eqx.filter_value_and_grad(mse)(model, x, y)
        if axis_name is not None:
            grads = jax.lax.pmean(grads, axis_name)
            loss = jax.lax.pmean(loss, axis_name)
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return eqx.apply_updates(model, updates), opt_state, loss

    return step


def make_floor_step(optimizer, static, counter: list):
    """The step written for speed: over the array pytree only, `static` closed over."""

    def loss_fn(params, x, y):
        return mse(eqx.combine(params, static), x, y)

    def step(params, opt_state, x, y):
        counter[0] += 1
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


class Runner(NamedTuple):
    """A variant ready to run: `step(model, opt_state, x, y)` and its first inputs;
    `params_of(model)` gives the trained arrays, to compare variants."""

    step: Callable
    model: object
    opt_state: object
    x: jax.Array
    y: jax.Array
    params_of: Callable


def setup(variant: str, prob: Problem, counter: list) -> Runner:
    opt, arrays = prob.optimizer, eqx.is_inexact_array
    if variant == FLOOR:
        params, static = eqx.partition(prob.model, arrays)
        step = jax.jit(make_floor_step(opt, static, counter))
        return Runner(step, params, prob.opt_state, prob.x, prob.y, lambda p: p)
    if variant == "eqx.filter_jit":
        step = eqx.filter_jit(make_model_step(opt, counter, None))
        return Runner(step, prob.model, prob.opt_state, prob.x, prob.y, _params_of)
    local = make_model_step(opt, counter, AXIS)
    if variant == "eqx.filter_pmap":
        step = eqx.filter_pmap(
            local,
            in_axes=(None, None, 0, 0),
            out_axes=(None, None, None),
            axis_name=AXIS,
        )
    elif variant == "pmap2":
        import eqx_pmapstate  # here: a broken library fails this variant alone

        step = eqx_pmapstate.pmap2(local)
    else:
        raise ValueError(f"Unknown variant {variant!r}.")
    return Runner(step, prob.model, prob.opt_state, prob.x_dev, prob.y_dev, _params_of)


def _params_of(model):
    return eqx.filter(model, eqx.is_inexact_array)


def run_steps(r: Runner, model, opt_state, k: int):
    """The user's loop, `k` steps, then waits for the results."""
    step, x, y, loss = r.step, r.x, r.y, None
    for _ in range(k):
        model, opt_state, loss = step(model, opt_state, x, y)
    return jax.block_until_ready((model, opt_state, loss))


# --------------------------------------------------------------------------- per step


def check_agreement(runners: dict, steps: int, tol: float) -> tuple[dict, dict, dict]:
    """Runs every variant `steps` steps from the same init; returns the states reached,
    the largest absolute difference of each one's parameters from the floor's, and the
    errors of the variants that failed or disagree (these are dropped from `runners`)."""
    states, diffs, errors = {}, {}, {}
    for name, r in runners.items():
        try:
            model, opt_state, _ = run_steps(r, r.model, r.opt_state, steps)
            for a in jax.tree.leaves(r.params_of(model)):
                if not a.sharding.is_fully_replicated:
                    raise AssertionError(f"a parameter came back laid out {a.sharding}")
            states[name] = (model, opt_state)
        except Exception as e:  # noqa: BLE001 - one variant's failure is reported
            errors[name] = _harness.error_text(e)
    if FLOOR in states:
        ref = [np.asarray(a) for a in jax.tree.leaves(states[FLOOR][0])]
        for name, (model, _) in states.items():
            got = jax.tree.leaves(runners[name].params_of(model))
            diffs[name] = max(
                float(np.max(np.abs(np.asarray(a) - b))) for a, b in zip(got, ref)
            )
            if not diffs[name] <= tol:
                errors[name] = (
                    f"AssertionError: after {steps} steps its parameters differ from "
                    f"the floor's by up to {diffs[name]:.3g}, more than {tol:g}"
                )
    for name in errors:
        runners.pop(name, None)
        states.pop(name, None)
    return states, diffs, errors


def time_steps(runners: dict, states: dict, rounds: int, k: int) -> dict:
    """Seconds per step of each variant, one list entry per round (interleaved)."""

    def one_round(name: str, r: Runner) -> Callable[[], None]:
        def run():  # the user's loop goes on from the state the last round reached
            model, opt_state = states[name]
            states[name] = run_steps(r, model, opt_state, k)[:2]

        return run

    runs = {name: one_round(name, r) for name, r in runners.items()}
    for run in runs.values():  # one more round each before timing
        run()
    return _harness.interleaved(runs, rounds, per_round=k)


def tolerance(steps: int) -> float:
    """Float32 sums in another order change Adam's normalised update by far less than
    one learning rate per step; a wrong update (a missing mean, a stale state) by more."""
    return 0.05 * LEARNING_RATE * steps


def bench_per_step(size: str, args) -> dict:
    prob = make_problem(size, args.batch)
    counters = {name: [0] for name in VARIANTS}
    runners, errors = {}, {}
    for name in VARIANTS:
        try:
            runners[name] = setup(name, prob, counters[name])
        except Exception as e:  # noqa: BLE001
            errors[name] = _harness.error_text(e)
    tol = tolerance(args.check_steps)
    states, diffs, failed = check_agreement(runners, args.check_steps, tol)
    errors.update(failed)
    times = time_steps(runners, states, args.rounds, args.steps_per_round)
    return {
        "n_params": n_params(prob.model),
        "times": times,
        "diffs": diffs,
        "tol": tol,
        "errors": errors,
    }


# --------------------------------------------------------------------------- first call


def child(args) -> dict:
    """The first call of one variant in this (fresh) process."""
    try:
        prob = make_problem(args.size, args.batch)
        counter = [0]
        r = setup(args.variant, prob, counter)
        with _harness.Clock() as clock:
            model, opt_state, loss = r.step(r.model, r.opt_state, r.x, r.y)
            jax.block_until_ready((model, opt_state, loss))
        traces = counter[0]
        jax.block_until_ready(r.step(model, opt_state, r.x, r.y))
        more = counter[0] - traces
        return {"wall": clock.wall, "cpu": clock.cpu, "traces": traces, "more": more}
    except Exception as e:  # noqa: BLE001
        return {"error": _harness.error_text(e)}


def run_child(variant: str, size: str, args) -> dict:
    argv = [os.path.abspath(__file__), "--variant", variant, "--size", size]
    argv += ["--batch", str(args.batch), "--platform", args.platform]
    argv += ["--devices", str(args.devices)]
    return _harness.run_child(argv, args.timeout)


def bench_first_calls(sizes, args) -> dict:
    """{size: {variant: [child results]}}, fresh processes interleaved round by round."""
    out = {size: {v: [] for v in VARIANTS} for size in sizes}
    for rnd in range(args.first_call_rounds):
        print(f"  first calls: round {rnd + 1} of {args.first_call_rounds}", flush=True)
        for size in sizes:
            for v in VARIANTS:
                out[size][v].append(run_child(v, size, args))
    return out


# --------------------------------------------------------------------------- report


def summarize(per_step: dict, firsts: dict) -> dict:
    """One row per variant: medians, or the error that stopped it."""
    rows = {}
    for v in VARIANTS:
        if v in per_step["errors"]:
            rows[v] = {"error": per_step["errors"][v]}
            continue
        ok = [r for r in firsts[v] if "error" not in r]
        errs = [r["error"] for r in firsts[v] if "error" in r]
        step, spread = _harness.median_spread(per_step["times"][v])
        rows[v] = {
            "step": step,
            "spread": spread,
            "first": statistics.median(r["wall"] for r in ok) if ok else None,
            "cpu": statistics.median(r["cpu"] for r in ok) if ok else None,
            "traces": sorted({r["traces"] for r in ok}),
            "more": sorted({r["more"] for r in ok}),
            "first_error": errs[0] if errs else None,
        }
    return rows


def _ratio(rows, v, key):
    a, b = rows.get(v, {}).get(key), rows.get(FLOOR, {}).get(key)
    return None if a is None or b is None else a / b


def _short(message: str) -> str:
    return message.splitlines()[0][:300]


def _fmt(x, spec, suffix=""):
    return "n/a" if x is None else f"{x:{spec}}{suffix}"


def print_table(size: str, per_step: dict, rows: dict, args) -> None:
    n = jax.device_count()
    print(
        f"\n== {size}: MLP {SIZES[size]}, {per_step['n_params']:,} parameters; batch "
        f"{args.batch} ({args.batch // n} per device) =="
    )
    head = (
        f"| {'variant':<16} | step (ms) | spread | x floor | first call (s) | x floor "
        f"| first CPU (s) | x floor | traces | +2nd call |"
    )
    print(head)
    print("|" + "|".join("-" * len(c) for c in head.split("|")[1:-1]) + "|")
    for v, row in rows.items():
        if "error" in row:
            print(f"| {v:<16} | FAILED: {_short(row['error'])}")
            continue
        cells = (
            _fmt(row["step"] * 1e3, "9.3f"),
            _fmt(row["spread"] * 100, "5.1f", "%"),
            _fmt(_ratio(rows, v, "step"), "6.2f", "x"),
            _fmt(row["first"], "14.2f"),
            _fmt(_ratio(rows, v, "first"), "6.2f", "x"),
            _fmt(row["cpu"], "13.2f"),
            _fmt(_ratio(rows, v, "cpu"), "6.2f", "x"),
            f"{','.join(map(str, row['traces'])) or 'n/a':>6}",
            f"{','.join(map(str, row['more'])) or 'n/a':>9}",
        )
        print(f"| {v:<16} | " + " | ".join(cells) + " |")
    for v, row in rows.items():
        if "error" in row and _short(row["error"]) != row["error"]:
            print(f"{v}: FAILED: {row['error']}")
        elif row.get("first_error"):
            print(f"{v}: first call FAILED: {row['first_error']}")
    diffs = ", ".join(f"{v} {d:.2e}" for v, d in per_step["diffs"].items())
    print(
        f"max |params - floor's| after {args.check_steps} steps (tolerance "
        f"{per_step['tol']:g}): {diffs}"
    )


def targets(rows: dict) -> list[tuple[str, bool | None]]:
    step, first = _ratio(rows, "pmap2", "step"), _ratio(rows, "pmap2", "first")
    ours = rows.get("pmap2", {}).get("step")
    theirs = rows.get("eqx.filter_pmap", {}).get("step")
    return [
        (
            f"pmap2 per step at most {STEP_TARGET}x the floor",
            None if step is None else step <= STEP_TARGET,
        ),
        (
            f"pmap2 first call at most {FIRST_CALL_TARGET}x the floor's",
            None if first is None else first <= FIRST_CALL_TARGET,
        ),
        (
            "pmap2 per step faster than eqx.filter_pmap",
            None if ours is None or theirs is None else ours < theirs,
        ),
    ]


def print_targets(size: str, rows: dict) -> list:
    marks = targets(rows)
    for text, met in marks:
        word = (
            "not measured (NOT met)" if met is None else ("met" if met else "NOT met")
        )
        print(f"target ({size}): {text}: {word}")
    return marks


def to_json(per_step: dict, all_rows: dict, args, head: dict) -> dict:
    """The results as one JSON-ready dict (times in seconds), after `head`
    (`_harness.record`: the date, the command, the machine)."""
    sizes = {}
    for size, rows in all_rows.items():
        variants = {}
        for v, row in rows.items():
            if "error" in row:
                variants[v] = {"error": row["error"]}
                continue
            variants[v] = {
                "step_s": row["step"],
                "step_spread": row["spread"],
                "step_ratio": _ratio(rows, v, "step"),
                "first_call_s": row["first"],
                "first_call_ratio": _ratio(rows, v, "first"),
                "first_call_cpu_s": row["cpu"],
                "first_call_cpu_ratio": _ratio(rows, v, "cpu"),
                "traces_first_call": row["traces"],
                "traces_second_call": row["more"],
                "first_call_error": row["first_error"],
                "step_times_s": per_step[size]["times"][v],
            }
        sizes[size] = {
            "mlp": SIZES[size],
            "n_params": per_step[size]["n_params"],
            "max_abs_diff_from_floor": per_step[size]["diffs"],
            "tolerance": per_step[size]["tol"],
            "variants": variants,
        }
    return {
        **head,
        "settings": {
            "batch": args.batch,
            "rounds": args.rounds,
            "steps_per_round": args.steps_per_round,
            "first_call_rounds": args.first_call_rounds,
            "check_steps": args.check_steps,
        },
        "floor": FLOOR,
        "sizes": sizes,
    }


def parse_args(argv):
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument(
        "--sizes",
        nargs="+",
        choices=sorted(SIZES | ZERO_SIZES),
        default=["small", "large"],
    )
    p.add_argument(
        "--zero",
        action="store_true",
        help="the optimizer state sharded (`eqx_pmapstate.zero`) against pmean + optax",
    )
    p.add_argument("--rounds", type=int, help=f"per-step rounds ({DEFAULTS['rounds']})")
    p.add_argument(
        "--steps-per-round",
        type=int,
        help=f"steps per round ({DEFAULTS['steps_per_round']})",
    )
    p.add_argument(
        "--first-call-rounds",
        type=int,
        help=f"fresh processes per variant and size ({DEFAULTS['first_call_rounds']})",
    )
    p.add_argument(
        "--quick", action="store_true", help=f"a smoke run: {QUICK} unless given"
    )
    p.add_argument("--batch", type=int, default=256, help="global batch (256)")
    p.add_argument(
        "--check-steps", type=int, default=3, help="steps before comparing (3)"
    )
    p.add_argument(
        "--gpu", action="store_true", help="the accelerators there are, not 8 CPUs"
    )
    p.add_argument("--platform", choices=("cpu", "gpu"), default="cpu")
    p.add_argument(
        "--devices",
        type=int,
        default=_harness.N_CPU_DEVICES,
        help="CPU devices (8); 1 shows the per-call cost, which a slow step hides",
    )
    p.add_argument(
        "--timeout", type=float, default=600.0, help="seconds per child process"
    )
    p.add_argument(
        "--json", metavar="PATH", help="also write the results as JSON to PATH"
    )
    p.add_argument("--variant", choices=VARIANTS, help=argparse.SUPPRESS)  # child
    p.add_argument("--size", choices=sorted(SIZES), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.gpu:
        args.platform = "gpu"
    for key, value in (QUICK if args.quick else DEFAULTS).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def _argv(argv) -> list[str]:
    return sys.argv[1:] if argv is None else list(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.platform == "gpu" and jax.default_backend() == "cpu":
        raise SystemExit("--gpu: JAX found no accelerator here.")
    if args.variant is not None:
        _harness.report(child(args))
        return 0
    if args.zero:
        return bench_zero(args, argv)
    if set(args.sizes) - set(SIZES):
        raise SystemExit(f"--sizes {sorted(ZERO_SIZES)} are measured with --zero only.")

    head = _harness.record("bench_train", SCRIPT, _argv(argv))
    print(_harness.describe_machine(head["machine"]))
    print(
        f"per step: median of {args.rounds} interleaved rounds of "
        f"{args.steps_per_round} steps; first call: median of "
        f"{args.first_call_rounds} fresh process(es) per variant"
    )
    per_step = {}
    for size in args.sizes:
        print(f"  per step: {size}", flush=True)
        per_step[size] = bench_per_step(size, args)
    firsts = bench_first_calls(args.sizes, args)
    marks, failed, all_rows = [], False, {}
    for size in args.sizes:
        rows = all_rows[size] = summarize(per_step[size], firsts[size])
        print_table(size, per_step[size], rows, args)
        marks += print_targets(size, rows)
        failed |= any("error" in r or r["first_error"] for r in rows.values())
    print(
        "\nall targets: "
        + ("met" if all(m for _, m in marks) else "NOT all met")
        + f" ({sum(bool(m) for _, m in marks)} of {len(marks)})"
        + ("; some variant FAILED (exit status 1)" if failed else "")
    )
    if args.json:
        _harness.write_json(args.json, to_json(per_step, all_rows, args, head))
    return 1 if failed else 0


# --------------------------------------------------------------------------- --zero


ZERO_VARIANTS = ("pmean + optax", "zero")


def zero_step(optimizer, sharded: bool):
    """The per-device step: `pmean` of the gradients then `optimizer`, or `zero`'s."""

    def step(model, opt_state, x, y):
        loss, grads = eqx.filter_value_and_grad(mse)(model, x, y)
        if not sharded:
            grads = jax.lax.pmean(grads, AXIS)
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return eqx.apply_updates(model, updates), opt_state, jax.lax.pmean(loss, AXIS)

    return step


def state_bytes_per_device(tree) -> int:
    """The bytes of the arrays of `tree` that the first device holds."""
    device = jax.devices()[0]
    return sum(
        s.data.nbytes
        for x in jax.tree.leaves(tree)
        for s in x.addressable_shards
        if s.device == device
    )


def zero_problem(size: str, batch: int):
    import eqx_pmapstate as ep

    kw = (SIZES | ZERO_SIZES)[size]
    model = ep.pmap2_new_states(
        lambda key: _mlp(kw, key),
        {"key": jax.random.key(0)},
        state_out_axes={None: eqx.is_inexact_array},
    )
    n = jax.device_count()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, batch // n, kw["in_size"]), dtype=np.float32)
    y = np.sin(x[..., : kw["out_size"]])
    per = NamedSharding(make_mesh(), P(AXIS))
    return model, jax.device_put(x, per), jax.device_put(y, per)


def zero_variant(name: str, model, x, y) -> tuple[dict, list]:
    """One variant's optimizer state and compiled step: its memory, and `[step, model,
    opt_state]` to run."""
    import eqx_pmapstate as ep

    sharded = name == "zero"
    adam = optax.adam(LEARNING_RATE)
    opt = ep.zero(adam) if sharded else adam
    params = eqx.filter(model, eqx.is_inexact_array)
    opt_state = ep.pmap2(lambda p: opt.init(p))(params)
    step = ep.pmap2(zero_step(opt, sharded))
    stats = step.lower(model, opt_state, x, y).compile().executable.memory_analysis()
    row = {
        "state_bytes_per_device": state_bytes_per_device(opt_state),
        "argument_bytes": stats.argument_size_in_bytes,
        "output_bytes": stats.output_size_in_bytes,
        "alias_bytes": stats.alias_size_in_bytes,
        "temp_bytes": stats.temp_size_in_bytes,
    }
    row["total_bytes"] = row["argument_bytes"] + row["output_bytes"] + row["temp_bytes"]
    return row, [step, model, opt_state]


def time_zero(runs: dict, x, y, args) -> dict:
    """Seconds per step of each run, one entry per round (interleaved)."""

    def one_round(r: list) -> Callable[[], None]:
        def run():  # `r` is `[step, model, opt_state]`, updated in place
            loss = None
            for _ in range(args.steps_per_round):
                r[1], r[2], loss = r[0](r[1], r[2], x, y)
            jax.block_until_ready((r[1], r[2], loss))

        return run

    runs = {name: one_round(r) for name, r in runs.items()}
    return _harness.interleaved(runs, args.rounds, per_round=args.steps_per_round)


def bench_zero_size(size: str, args) -> dict:
    model, x, y = zero_problem(size, args.batch)
    out = {"n_params": n_params(model), "variants": {}}
    # Both variants at once do not fit in the host memory of 8 CPU devices at 67M
    # parameters: there, one after the other (their rounds are then not interleaved).
    sequential = size in ZERO_SIZES
    out["interleaved"] = not sequential
    runs, checked, times = {}, {}, {}
    for name in ZERO_VARIANTS:
        out["variants"][name], r = zero_variant(name, model, x, y)
        for _ in range(args.check_steps):
            r[1], r[2], _loss = r[0](r[1], r[2], x, y)
        leaves = jax.tree.leaves(eqx.filter(r[1], eqx.is_array))
        checked[name] = [np.asarray(a) for a in leaves]
        runs[name] = r
        if sequential:
            times.update(time_zero(runs, x, y, args))
            runs.clear()
            del r
    times.update(time_zero(runs, x, y, args))
    a, b = (checked[v] for v in ZERO_VARIANTS)
    out["max_abs_diff"] = max(float(np.max(np.abs(u - w))) for u, w in zip(a, b))
    for name in ZERO_VARIANTS:
        out["variants"][name]["step_s"] = statistics.median(times[name])
        out["variants"][name]["step_times_s"] = times[name]
    return out


def zero_targets(result: dict) -> list[tuple[str, bool]]:
    n = jax.device_count()
    rep, zero = (result["variants"][v] for v in ZERO_VARIANTS)
    # Padding: at most n - 1 elements (4 bytes) per leaf of a parameter's shape.
    padding = 4 * (n - 1) * result["n_state_leaves"]
    saved = rep["state_bytes_per_device"] - zero["state_bytes_per_device"]
    return [
        (
            "optimizer state per device at most 1/n of the replicated one + padding",
            zero["state_bytes_per_device"]
            <= rep["state_bytes_per_device"] / n + padding,
        ),
        (
            "compiled step's memory lower by at least the state saved",
            rep["total_bytes"] - zero["total_bytes"] >= saved,
        ),
        (
            f"step at most {STEP_TARGET}x pmean + optax",
            zero["step_s"] <= STEP_TARGET * rep["step_s"],
        ),
    ]


def bench_zero(args, argv) -> int:
    head = _harness.record("bench_train --zero", SCRIPT, _argv(argv))
    head["source"] = f"measured: written by {SCRIPT} --zero --json"
    print(
        f"{_harness.describe_machine(head['machine'])}; optax.adam, batch "
        f"{args.batch}; per step: median of {args.rounds} interleaved rounds of "
        f"{args.steps_per_round}"
    )
    results, all_met = {}, True
    for size in args.sizes:
        r = results[size] = bench_zero_size(size, args)
        kw = (SIZES | ZERO_SIZES)[size]
        r["n_state_leaves"] = 2 * 2 * (kw["depth"] + 1)  # mu and nu of each w and b
        print(f"\n== {size}: MLP {kw}, {r['n_params']:,} parameters ==")
        print(
            "| variant       | state/device (MiB) | arguments | outputs | temporaries "
            "| total (MiB) | step (ms) |"
        )
        print(
            "|---------------|--------------------|-----------|---------|-------------|-------------|-----------|"
        )
        for v, row in r["variants"].items():
            mib = [
                row[k] / 2**20
                for k in ("argument_bytes", "output_bytes", "temp_bytes", "total_bytes")
            ]
            print(
                f"| {v:<13} | {row['state_bytes_per_device'] / 2**20:18.3f} | "
                f"{mib[0]:9.3f} | {mib[1]:7.3f} | {mib[2]:11.3f} | {mib[3]:11.3f} | "
                f"{row['step_s'] * 1e3:9.3f} |"
            )
        rep, zero = (r["variants"][v] for v in ZERO_VARIANTS)
        print(
            f"state {rep['state_bytes_per_device'] / zero['state_bytes_per_device']:.2f}x "
            f"smaller; step {zero['step_s'] / rep['step_s']:.3f}x; max |params zero - "
            f"pmean| after {args.check_steps} steps: {r['max_abs_diff']:.2e}"
        )
        for text, met in zero_targets(r):
            all_met &= met
            print(f"target ({size}): {text}: {'met' if met else 'NOT met'}")
    print(f"\nall targets: {'met' if all_met else 'NOT all met'}")
    if args.json:
        info = {
            **head,
            "settings": {
                "batch": args.batch,
                "rounds": args.rounds,
                "steps_per_round": args.steps_per_round,
                "check_steps": args.check_steps,
            },
            "sizes": results,
        }
        _harness.write_json(args.json, info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
