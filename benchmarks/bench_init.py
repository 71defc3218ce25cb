"""Benchmark: creating many random states laid out over 8 CPU devices.

How to run:

    make bench                                 # runs `.venv/bin/python benchmarks/bench_init.py`
    .venv/bin/python benchmarks/bench_init.py  # the same: 200 states of (256, 256), 8 devices
    .venv/bin/python benchmarks/bench_init.py --states 20 --shape 64   # a quick run

Three variants create the same states, `--states` float32 arrays of shape
`(--shape, --shape)` drawn with `jax.random.normal`, per device, from per-device keys
(`jax.random.split(key, 8)`, each split again into one key per state):

- (a) `eqx_pmapstate.pmap2_new_states(make, {"key": keys}, init_in_axes={"key": 0})`, where
  `make(key)` returns a list of `eqx_pmapstate.ParamState`s;
- (b) the hand-written floor: `jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("devices"),
  out_specs=P("devices")))` over a one-dimensional mesh;
- (c) brainstate's `brainstate.transform.pmap2_new_states` on a `brainstate.nn.Module`
  whose `init_state` makes the same `brainstate.ParamState`s. brainstate is not a
  dependency of this project and may need another JAX, so it runs under its own
  interpreter: `--brainstate-python PATH` (default: the environment variable
  `BRAINSTATE_PYTHON`, else this interpreter), for example a separate venv made with
  `python3.11 -m venv .venv-bench && .venv-bench/bin/pip install brainstate==0.5.4
  jax==0.10.2 jaxlib==0.10.2`. Without brainstate the variant is skipped.

Each variant runs in its own fresh Python process (this script re-invokes itself with
`--variant a|b|c` and reads one JSON line from the child's stdout). The *first call* is
the first call of a new function in that new process, compilation included; the
*repeated call* is the median of `--repeats` further calls with fresh keys of the same
shapes. Every time is wall time up to `jax.block_until_ready` on the result; making the
keys is not timed. The CPU time of the child process (all its threads) over the same span
is shown beside it: on a small shared machine it is far less disturbed by other processes
than wall time. `--rounds R` runs every variant in R fresh processes, interleaved
(a, b, c, a, b, c, ...), and takes medians over them. Each child checks what it made
(count, shapes, devices, that shards differ between devices, and a checksum that must be
equal for (a) and (b), which use the same keys).

`--json PATH` also writes the results (the settings, the machine, and per variant the
medians and every child's raw times) as JSON, for `benchmarks/plot_results.py`.

The target is a/b (wall) at most 1.2 for both the first and the repeated call.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

import _harness


TARGET = 1.2


# --------------------------------------------------------------------------- child side


def _setup_jax(n_devices: int):
    _harness.use_devices("cpu", n_devices)
    import jax

    return jax


def _summary(jax, arrays, n_devices, shape) -> dict:
    """Facts about the result, to check that the variants made the same thing."""
    import numpy as np

    first, last = np.asarray(arrays[0]), np.asarray(arrays[-1])
    expected = (n_devices, *shape)
    return {
        "n_states": len(arrays),
        "shapes_ok": all(tuple(a.shape) == expected for a in arrays),
        "dtype": str(arrays[0].dtype),
        "n_devices_used": len(arrays[0].sharding.device_set),
        "shards_differ": bool(not np.array_equal(first[0], first[1])),
        "checksum": float(
            first.astype(np.float64).sum() + last.astype(np.float64).sum()
        ),
    }


def _time_calls(jax, call, make_inputs, repeats: int, summarize):
    """Times `call(*make_inputs(i))` for i = 0 (first) and 1..repeats; returns the wall
    and CPU times (all threads of this process) and `summarize` of the first result. Each result is dropped (and garbage collected)
    before the next call, so that no call pays for memory still held by an earlier one."""
    import gc

    times, cpu, summary = [], [], {}
    for i in range(repeats + 1):
        inputs = jax.block_until_ready(make_inputs(i))
        gc.collect()
        with _harness.Clock() as clock:
            out = call(*inputs)
            jax.block_until_ready(out)
        times.append(clock.wall)
        cpu.append(clock.cpu)
        if i == 0:
            summary = summarize(out)
        del out
    return {"times": times, "cpu": cpu, **summary}


def _keys(jax, seed: int, n_devices: int):
    return jax.random.split(jax.random.PRNGKey(seed), n_devices)


def variant_a(args) -> dict:
    jax = _setup_jax(args.devices)
    import eqx_pmapstate

    n, shape = args.states, (args.shape, args.shape)

    def make(key):
        ks = jax.random.split(key, n)
        return [
            eqx_pmapstate.ParamState(jax.random.normal(ks[i], shape)) for i in range(n)
        ]

    def call(keys):
        return eqx_pmapstate.pmap2_new_states(
            make, {"key": keys}, init_in_axes={"key": 0}
        )

    def summarize(out):
        return _summary(jax, [s.value for s in out], args.devices, shape)

    timed = _time_calls(
        jax, call, lambda i: (_keys(jax, i, args.devices),), args.repeats, summarize
    )
    where = os.path.dirname(os.path.dirname(os.path.abspath(eqx_pmapstate.__file__)))
    return {**timed, "note": f"eqx_pmapstate {eqx_pmapstate.__version__} from {where}"}


def variant_b(args) -> dict:
    jax = _setup_jax(args.devices)
    from jax.sharding import PartitionSpec as P

    n, shape = args.states, (args.shape, args.shape)
    mesh = jax.make_mesh(
        (args.devices,), ("devices",), axis_types=(jax.sharding.AxisType.Auto,)
    )

    def body(key):  # key: (1, 2), this device's key
        ks = jax.random.split(key[0], n)
        return [jax.random.normal(ks[i], shape)[None] for i in range(n)]

    f = jax.jit(
        jax.shard_map(body, mesh=mesh, in_specs=P("devices"), out_specs=P("devices"))
    )

    def summarize(out):
        return _summary(jax, out, args.devices, shape)

    timed = _time_calls(
        jax, f, lambda i: (_keys(jax, i, args.devices),), args.repeats, summarize
    )
    return {**timed, "note": f"jax {jax.__version__}"}


def variant_c(args) -> dict:
    jax = _setup_jax(args.devices)
    try:
        import brainstate  # pyright: ignore[reportMissingImports]
    except ImportError as e:
        return {"skipped": f"{e}, under {sys.executable}"}

    n, shape = args.states, (args.shape, args.shape)

    class Many(brainstate.nn.Module):
        def __init__(self, seed):
            super().__init__()
            # Read in `init_state`, this RandomState is split into one key per device by
            # `pmap2_new_states` (lax.axis_index cannot be used: brainstate runs the init
            # once eagerly, outside any mapped axis, first).
            self.rng = brainstate.random.RandomState(seed)

        def init_state(self):
            ks = jax.random.split(self.rng.value, n)
            self.ws = [
                brainstate.ParamState(jax.random.normal(ks[i], shape)) for i in range(n)
            ]

    def call(seed):
        module = Many(seed)
        brainstate.transform.pmap2_new_states(module, {}, axis_size=args.devices)
        return [w.value for w in module.ws]

    def summarize(out):
        return _summary(jax, out, args.devices, shape)

    timed = _time_calls(jax, call, lambda i: (i,), args.repeats, summarize)
    note = (
        f"brainstate {brainstate.__version__}, jax {jax.__version__}; per-device keys from a "
        "brainstate.random.RandomState read in init_state (split per device by brainstate)"
    )
    return {**timed, "note": note}


VARIANTS = {"a": variant_a, "b": variant_b, "c": variant_c}
LABELS = {
    "a": "(a) eqx_pmapstate.pmap2_new_states",
    "b": "(b) jit(shard_map) floor",
    "c": "(c) brainstate.transform.pmap2_new_states",
}


# --------------------------------------------------------------------------- parent side


def _run_child(variant: str, args, python: str) -> dict:
    argv = [os.path.abspath(__file__), "--variant", variant]
    argv += ["--states", str(args.states), "--shape", str(args.shape)]
    argv += ["--repeats", str(args.repeats), "--devices", str(args.devices)]
    return _harness.run_child(argv, args.timeout, python, tail=15, sep="\n    ")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    p.add_argument(
        "--states", type=int, default=200, help="number of states (default 200)"
    )
    p.add_argument(
        "--shape",
        type=int,
        default=256,
        help="each state is (shape, shape) (default 256)",
    )
    p.add_argument(
        "--devices", type=int, default=8, help="number of CPU devices (default 8)"
    )
    p.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="repeated calls to take the median of (default 3)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="fresh processes per variant, interleaved (default 1)",
    )
    p.add_argument(
        "--variants", default="abc", help="which variants to run (default abc)"
    )
    p.add_argument(
        "--brainstate-python",
        default=os.environ.get("BRAINSTATE_PYTHON") or sys.executable,
        help="interpreter for variant (c) (default: $BRAINSTATE_PYTHON, else this one)",
    )
    p.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds allowed per variant"
    )
    p.add_argument(
        "--json", metavar="PATH", help="also write the results as JSON to PATH"
    )
    p.add_argument(
        "--variant", choices=sorted(VARIANTS), help=argparse.SUPPRESS
    )  # child mode
    args = p.parse_args(argv)

    if args.variant is not None:
        _harness.report(VARIANTS[args.variant](args))
        return 0

    _harness.use_devices("cpu", args.devices)  # for the machine block
    load = _harness.LOAD_AT_START
    print(
        f"{args.states} states of ({args.shape}, {args.shape}) float32 per device, {args.devices} CPU "
        f"devices, {os.cpu_count()} cores; first call = new function in a new process; repeated = "
        f"median of {args.repeats} calls; {args.rounds} round(s), variants interleaved"
    )
    if load > 0.5:
        print(
            f"note: load average {load:.2f} at start; other processes distort wall times (see CPU times)"
        )
    results: dict = {v: [] for v in args.variants}
    for rnd in range(args.rounds):
        for v in args.variants:
            if any("times" not in r for r in results[v]):
                continue  # skipped or failed: not worth another round
            python = args.brainstate_python if v == "c" else sys.executable
            print(f"round {rnd + 1}: running {LABELS[v]} ...", flush=True)
            results[v].append(_run_child(v, args, python))

    stats: dict = {}  # variant -> (first wall, repeated wall, first cpu, repeated cpu)
    for v, rs in results.items():
        ok = [r for r in rs if "times" in r]
        if ok and len(ok) == len(rs):
            rep_w = [t for r in ok for t in r["times"][1:]]
            rep_c = [t for r in ok for t in r["cpu"][1:]]
            stats[v] = (
                statistics.median(r["times"][0] for r in ok),
                statistics.median(rep_w) if rep_w else None,
                statistics.median(r["cpu"][0] for r in ok),
                statistics.median(rep_c) if rep_c else None,
            )

    def fmt(x):
        return "n/a" if x is None else f"{x:.3f}"

    heads = ("first call (s)", "repeated call (s)", "first CPU (s)", "repeated CPU (s)")
    w = max([len(LABELS[v]) for v in stats] + [10])
    print()
    print(f"| {'variant':<{w}} | " + " | ".join(heads) + " |")
    print(f"| {'-' * w} | " + " | ".join("-" * len(h) for h in heads) + " |")
    for v, st in stats.items():
        print(
            f"| {LABELS[v]:<{w}} | "
            + " | ".join(f"{fmt(x):>{len(h)}}" for x, h in zip(st, heads))
            + " |"
        )
    print()
    for v, rs in results.items():
        for r in rs:
            if "skipped" in r:
                print(
                    "brainstate not installed: skipped"
                    if v == "c"
                    else f"{LABELS[v]}: skipped"
                )
                print(f"    ({r['skipped']})")
            elif "error" in r:
                print(f"{LABELS[v]}: FAILED: {r['error']}")
            else:
                print(
                    f"{LABELS[v]}: wall {[round(t, 3) for t in r['times']]}, "
                    f"CPU {[round(t, 2) for t in r['cpu']]}; {r['n_states']} states, "
                    f"shapes ok {r['shapes_ok']}, {r['dtype']}, on {r['n_devices_used']} devices, "
                    f"shards differ {r['shards_differ']}, checksum {r['checksum']:.6g}"
                    + (f"; {r['note']}" if r["note"] else "")
                )
    sums = {
        r["checksum"] for v in ("a", "b") for r in results.get(v, []) if "checksum" in r
    }
    if len(sums) > 1:
        print("WARNING: (a) and (b) made different values from the same keys")
    print()

    def ratio(x, y, k):
        return (
            None
            if x not in stats or y not in stats or None in (stats[x][k], stats[y][k])
            else stats[x][k] / stats[y][k]
        )

    def show(r):
        return "n/a" if r is None else f"{r:.3g}"

    ab_first, ab_rep = ratio("a", "b", 0), ratio("a", "b", 1)
    print(
        f"a/b first call:    {show(ab_first)}   (CPU time: {show(ratio('a', 'b', 2))})"
    )
    print(f"a/b repeated call: {show(ab_rep)}   (CPU time: {show(ratio('a', 'b', 3))})")
    print(
        f"a/c first call:    {show(ratio('a', 'c', 0))}   (CPU time: {show(ratio('a', 'c', 2))})"
    )
    print(
        f"a/c repeated call: {show(ratio('a', 'c', 1))}   (CPU time: {show(ratio('a', 'c', 3))})"
    )
    if ab_first is not None and ab_rep is not None:
        met = ab_first <= TARGET and ab_rep <= TARGET
        print(
            f"target: both a/b ratios (wall) at most {TARGET}: {'met' if met else 'NOT met'}"
        )
    else:
        print(f"target: both a/b ratios (wall) at most {TARGET}: not measured")
    if args.json:
        write_json(args, results, stats, argv)
    return 0


def write_json(args, results: dict, stats: dict, argv) -> None:
    """The results as JSON: the settings, the machine, per variant the medians (seconds;
    None where not measured) and every child's raw result."""
    variants = {}
    for v, rs in results.items():
        st = stats.get(v)
        variants[v] = {
            "label": LABELS[v],
            "first_call_s": st[0] if st else None,
            "repeated_s": st[1] if st else None,
            "first_call_cpu_s": st[2] if st else None,
            "repeated_cpu_s": st[3] if st else None,
            "runs": rs,
        }
    command = sys.argv[1:] if argv is None else argv
    out = {
        **_harness.record("bench_init", "benchmarks/bench_init.py", command),
        "settings": {
            "states": args.states,
            "shape": [args.shape, args.shape],
            "devices": args.devices,
            "repeats": args.repeats,
            "rounds": args.rounds,
        },
        "variants": variants,
    }
    out["machine"]["devices"] = f"{args.devices} CPU devices"  # as the older records
    _harness.write_json(args.json, out)


if __name__ == "__main__":
    sys.exit(main())
