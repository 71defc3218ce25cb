"""Per-call time of a trivial training-like step over many small arrays, on 8 CPU devices.

Compares `eqx_pmapstate.pmap2` (its replication proof, and the opt-in run-time check)
with the floor, `jax.jit` on the same sharded arrays, and with
`jax.jit(jax.shard_map(...))` and `eqx.filter_pmap`. Calls are interleaved and each
figure is a median over repeats; the ratios to the floor are what matter. Then the first
call (trace, compile, run) of `x + 1` on `--first-calls` leaf counts, each in a fresh
process, the floor and `pmap2` interleaved; with `--first-call-step grads`, of a training
step whose parameters are the leaves, with `pmean`'d gradients (`--first-calls-only`
times only these). Run: `.venv/bin/python
benchmarks/bench_step.py`; `--json PATH` also writes the results (the machine, the
settings, every time in seconds and its ratio to the floor) as JSON, for
`benchmarks/plot_results.py`.
"""

import argparse
import resource
import statistics
import sys

import _harness


_harness.use_devices("cpu", 8)  # before JAX starts

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import (
    NamedSharding,  # noqa: E402
    PartitionSpec as P,  # noqa: E402
)

import eqx_pmapstate as ep  # noqa: E402


def mesh8():
    return jax.make_mesh((8,), ("devices",), axis_types=(jax.sharding.AxisType.Auto,))


def timed(fns, repeats, calls):
    """The median seconds per call of each `f()`, over `repeats` interleaved rounds of
    `calls` calls."""
    for f in fns.values():  # compile, and warm the caches
        jax.block_until_ready(f())
        jax.block_until_ready(f())

    def round_of(f):
        def run():
            out = None
            for _ in range(calls):
                out = f()
            jax.block_until_ready(out)

        return run

    runs = {k: round_of(f) for k, f in fns.items()}
    times = _harness.interleaved(runs, repeats, per_round=calls)
    return {k: _harness.median_spread(v)[0] for k, v in times.items()}


SHARD_MAP_LEAVES = 1000  # above, the hand-written `jit(shard_map)` is not measured


def trivial_body(xs):
    return [x + 1.0 for x in xs]


def trivial_leaves(mesh, n_leaves) -> list:
    """`n_leaves` arrays of shape (8, 16) laid out along the device axis."""
    per = NamedSharding(mesh, P("devices"))
    xs = [jax.device_put(jnp.full((8, 16), float(i)), per) for i in range(n_leaves)]
    return jax.block_until_ready(xs)


def bench_trivial(n_leaves, repeats, calls, with_filter_pmap=True):
    """`x + 1` on every leaf; leaves of shape (8, 16) laid out along the device axis.
    The hand-written `jit(shard_map)` only up to `SHARD_MAP_LEAVES` leaves: XLA's Shardy
    partitioner compiles a `shard_map` in time quadratic in its operands (about 200 s at
    10,000 on the 2-core machine)."""
    mesh = mesh8()
    xs = trivial_leaves(mesh, n_leaves)
    body = trivial_body
    floor = jax.jit(body)
    spec = [P("devices")] * n_leaves
    shmap = jax.jit(
        jax.shard_map(
            body, mesh=mesh, in_specs=(spec,), out_specs=spec, check_vma=False
        )
    )
    ours = ep.pmap2(body)
    fns = {
        "jax.jit (floor)": lambda: floor(xs),
        "jit(shard_map)": lambda: shmap(xs),
        "pmap2": lambda: ours(xs),
    }
    if n_leaves > SHARD_MAP_LEAVES:
        del fns["jit(shard_map)"]
    if with_filter_pmap:
        fpmap = eqx.filter_pmap(body, axis_name="devices")
        fns["eqx.filter_pmap"] = lambda: fpmap(xs)  # the same laid-out arrays
    return timed(fns, repeats, calls)


def bench_check(n_leaves, repeats, calls):
    """Half replicated "parameters" updated with a `pmean`'d value, half per-device
    states. pmap2 proves the parameters replicated when it traces the step, so its default
    (`check_replicated=True`) should cost nothing against `check_replicated=False`. The
    opt-in run-time comparison (`"runtime"`) is measured on a step whose parameters the
    proof cannot settle (`(s - s)` is equal everywhere but computed from per-device data)."""
    mesh = mesh8()
    rep = NamedSharding(mesh, P())
    per = NamedSharding(mesh, P("devices"))
    params = [
        jax.device_put(jnp.full((8, 16), float(i)), rep) for i in range(n_leaves // 2)
    ]
    states = [
        jax.device_put(jnp.ones((8, 8, 16)), per)
        for _ in range(n_leaves - n_leaves // 2)
    ]

    def proved(params, states):
        g = jax.lax.pmean(states[0].sum(), "devices")
        return [p - 1e-3 * g for p in params], [s + 1.0 for s in states]

    def unproved(params, states):
        g = (states[0] - states[0]).sum()
        return [p - 1e-3 * g for p in params], [s + 1.0 for s in states]

    fns = {
        "proof (default)": ep.pmap2(proved),
        "no check": ep.pmap2(proved, check_replicated=False),
        "runtime": ep.pmap2(unproved, check_replicated="runtime"),
        "runtime, unchecked": ep.pmap2(unproved, check_replicated=False),
    }
    return timed(
        {k: (lambda f=f: f(params, states)) for k, f in fns.items()}, repeats, calls
    )


FIRST_VARIANTS = ("jax.jit (floor)", "pmap2")
FIRST_CALL_TARGET = 1.1  # pmap2's first call, at most this times the floor's


FIRST_STEPS = ("add", "grads")


def _grads_inputs(mesh, n_leaves):
    """`n_leaves` replicated parameters of shape (16,), and a batch of 4 rows per device."""
    rep = NamedSharding(mesh, P())
    ws = [jax.device_put(jnp.full((16,), 0.01 * i), rep) for i in range(n_leaves)]
    x = jnp.linspace(-1.0, 1.0, 8 * 4 * 16).reshape(8, 4, 16)
    return ws, jax.device_put(x, NamedSharding(mesh, P("devices")))


def _loss(ws, x):
    return sum(jnp.mean((x * w) ** 2) for w in ws)


def grads_local(ws, x):
    """The per-device step: the gradients `pmean`'d over the devices, then SGD."""
    grads = jax.lax.pmean(jax.grad(_loss)(ws, x), "devices")
    return [w - 0.1 * g for w, g in zip(ws, grads)]


def grads_floor(ws, x):
    """The same step written for `jax.jit` on the global batch (no `pmean`)."""
    grads = jax.grad(_loss)(ws, x.reshape(-1, x.shape[-1]))
    return [w - 0.1 * g for w, g in zip(ws, grads)]


def first_call_child(variant: str, n_leaves: int, step: str = "add") -> dict:
    """The first call (trace, compile, run) in this (fresh) process of `step` on
    `n_leaves` leaves: `add` is `x + 1` on each; `grads` a training step whose
    parameters are the leaves, with its gradients `pmean`'d (a collective per leaf)."""
    floor = variant == FIRST_VARIANTS[0]
    if step == "add":
        args = (trivial_leaves(mesh8(), n_leaves),)
        f = jax.jit(trivial_body) if floor else ep.pmap2(trivial_body)
    else:
        args = _grads_inputs(mesh8(), n_leaves)
        f = jax.jit(grads_floor) if floor else ep.pmap2(grads_local)
    with _harness.Clock() as clock:
        jax.block_until_ready(f(*args))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    return {"wall": clock.wall, "cpu": clock.cpu, "peak_rss_bytes": peak}


def bench_first_calls(sizes, rounds: int, timeout: float, step: str = "add") -> dict:
    """{leaves: {variant: {"wall": median, "cpu": median, "runs": [...]}}}: each first
    call in a fresh process, the variants interleaved round by round."""
    runs = {n: {v: [] for v in FIRST_VARIANTS} for n in sizes}
    for rnd in range(rounds):
        print(f"  first calls: round {rnd + 1} of {rounds}", flush=True)
        for n in sizes:
            for v in FIRST_VARIANTS:
                argv = [__file__, "--first-call-child", v, "--leaves", str(n)]
                argv += ["--first-call-step", step]
                runs[n][v].append(_harness.run_child(argv, timeout))
    out = {}
    for n, by_variant in runs.items():
        out[n] = {}
        for v, results in by_variant.items():
            ok = [r for r in results if "error" not in r]
            errors = [r["error"] for r in results if "error" in r]
            out[n][v] = {
                "wall": statistics.median(r["wall"] for r in ok) if ok else None,
                "cpu": statistics.median(r["cpu"] for r in ok) if ok else None,
                "peak_rss_bytes": max(r["peak_rss_bytes"] for r in ok) if ok else None,
                "runs": results,
                "error": errors[0] if errors else None,
            }
        for v in FIRST_VARIANTS:
            for clock in ("wall", "cpu"):
                mine, floor = out[n][v][clock], out[n][FIRST_VARIANTS[0]][clock]
                out[n][v][f"ratio_{clock}"] = (
                    None if mine is None or floor is None else mine / floor
                )
    return out


def print_first_calls(firsts: dict, rounds: int, step: str = "add") -> None:
    what = "`x + 1`" if step == "add" else "a step with `pmean`'d gradients"
    print(
        f"\nFirst call (trace, compile, run) of {what}, median of {rounds} fresh "
        "process(es) per variant; wall and CPU time:"
    )
    floor, ours = FIRST_VARIANTS
    for n, r in firsts.items():
        if r[floor]["error"] or r[ours]["error"]:
            print(f"  {n:>6} leaves: FAILED: {r[floor]['error'] or r[ours]['error']}")
            continue
        print(
            f"  {n:>6} leaves: floor {r[floor]['wall']:7.2f} s (CPU "
            f"{r[floor]['cpu']:7.2f} s), pmap2 {r[ours]['wall']:7.2f} s (CPU "
            f"{r[ours]['cpu']:7.2f} s): {r[ours]['ratio_wall']:5.2f}x "
            f"(CPU {r[ours]['ratio_cpu']:5.2f}x); peak memory of the process: floor "
            f"{r[floor]['peak_rss_bytes'] / 1e9:.2f} GB, pmap2 "
            f"{r[ours]['peak_rss_bytes'] / 1e9:.2f} GB"
        )
    print(f"  target: pmap2 at most {FIRST_CALL_TARGET}x the floor's first call")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--leaves", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--scaling", type=int, nargs="*", default=[100, 1000, 10000])
    parser.add_argument(
        "--first-calls",
        type=int,
        nargs="*",
        default=[1000],
        metavar="LEAVES",
        help="leaf counts whose first call is timed in fresh processes (1000)",
    )
    parser.add_argument(
        "--first-call-rounds",
        type=int,
        default=5,
        help="fresh processes per variant and leaf count (5)",
    )
    parser.add_argument(
        "--first-call-step",
        choices=FIRST_STEPS,
        default="add",
        help="the step of the first calls: `x + 1` on each leaf (add), or a training "
        "step whose parameters are the leaves, with `pmean`'d gradients (grads)",
    )
    parser.add_argument(
        "--first-calls-only",
        action="store_true",
        help="time only the first calls",
    )
    parser.add_argument(
        "--timeout", type=float, default=600.0, help="seconds per child process"
    )
    parser.add_argument(
        "--json", metavar="PATH", help="also write the results as JSON to PATH"
    )
    parser.add_argument(
        "--first-call-child", choices=FIRST_VARIANTS, help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.first_call_child is not None:
        _harness.report(
            first_call_child(args.first_call_child, args.leaves, args.first_call_step)
        )
        return
    if args.first_calls_only:
        firsts = bench_first_calls(
            args.first_calls, args.first_call_rounds, args.timeout, args.first_call_step
        )
        print_first_calls(firsts, args.first_call_rounds, args.first_call_step)
        if args.json:
            results = {
                **_harness.record(
                    "bench_step", "benchmarks/bench_step.py", sys.argv[1:]
                ),
                "settings": {
                    "first_call_rounds": args.first_call_rounds,
                    "first_call_step": args.first_call_step,
                },
                "floor": "jax.jit (floor)",
                "first_call": {str(n): by for n, by in firsts.items()},
            }
            _harness.write_json(args.json, results)
        return

    res = bench_trivial(args.leaves, args.repeats, args.calls)
    base = res["jax.jit (floor)"]
    print(
        f"Per-call time of `x + 1` on {args.leaves} leaves of (8, 16) laid out over 8 CPU devices"
    )
    print(f"(median of {args.repeats} interleaved rounds of {args.calls} calls)")
    for k, v in res.items():
        print(f"  {k:<18} {v * 1e3:8.3f} ms   {v / base:5.2f}x floor")
    print("  target: pmap2 at most 1.15x the floor, and faster than eqx.filter_pmap")

    chk = bench_check(args.leaves, args.repeats, args.calls)
    print(
        f"\nReplication checks, {args.leaves // 2} replicated + "
        f"{args.leaves - args.leaves // 2} per-device leaves:"
    )
    print(
        f"  proved at trace time (default) {chk['proof (default)'] * 1e3:.3f} ms, "
        f"no check {chk['no check'] * 1e3:.3f} ms: "
        f"{chk['proof (default)'] / chk['no check']:.2f}x"
    )
    print(
        f"  opt-in run-time comparison {chk['runtime'] * 1e3:.3f} ms, the same step "
        f"unchecked {chk['runtime, unchecked'] * 1e3:.3f} ms: "
        f"{chk['runtime'] / chk['runtime, unchecked']:.2f}x"
    )

    print("\nAs the tree grows (per-call time; overhead = pmap2 minus floor):")
    scaling = {}
    for n in args.scaling:
        calls = max(2, args.calls * 100 // max(n, 100))
        r = scaling[n] = bench_trivial(
            n, max(3, args.repeats // 3), calls, with_filter_pmap=False
        )
        fl, ours = r["jax.jit (floor)"], r["pmap2"]
        print(
            f"  {n:>6} leaves: floor {fl * 1e3:9.3f} ms ({fl / n * 1e6:6.2f} us/leaf), pmap2 "
            f"{ours * 1e3:9.3f} ms ({ours / n * 1e6:6.2f} us/leaf), {ours / fl:5.2f}x"
        )
    firsts = bench_first_calls(
        args.first_calls, args.first_call_rounds, args.timeout, args.first_call_step
    )
    print_first_calls(firsts, args.first_call_rounds, args.first_call_step)
    if args.json:
        results = {
            **_harness.record("bench_step", "benchmarks/bench_step.py", sys.argv[1:]),
            "settings": {
                "leaves": args.leaves,
                "repeats": args.repeats,
                "calls": args.calls,
                "leaf_shape": [8, 16],
                "first_call_rounds": args.first_call_rounds,
                "first_call_step": args.first_call_step,
            },
            "floor": "jax.jit (floor)",
            "trivial": {k: {"call_s": v, "ratio": v / base} for k, v in res.items()},
            "replication_checks": {k: {"call_s": v} for k, v in chk.items()},
            "scaling": {
                str(n): {
                    k: {"call_s": v, "ratio": v / r["jax.jit (floor)"]}
                    for k, v in r.items()
                }
                for n, r in scaling.items()
            },
            "first_call": {str(n): by for n, by in firsts.items()},
        }
        print()
        _harness.write_json(args.json, results)


if __name__ == "__main__":
    main()
