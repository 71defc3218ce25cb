"""The benchmarks' results as one figure, for the documentation's Performance page.

How to run (from the repository root; needs matplotlib):

    .venv/bin/python benchmarks/plot_results.py    # writes docs/figures/performance.png
    .venv/bin/python benchmarks/plot_results.py --results benchmarks/results --out perf.png

It reads the JSON files that the benchmark scripts write with `--json` (in
`benchmarks/results/` by default):

- `bench_train_cpu.json` and `bench_train_gpu.json` (`benchmarks/bench_train.py --json`,
  on 8 CPU devices and with `--gpu`): the time per training step of `eqx.filter_jit`,
  `eqx.filter_pmap` and `pmap2`, as a ratio to the hand-written `jax.jit` floor, at both
  model sizes. One panel per file.
- `bench_init_cpu.json` (`benchmarks/bench_init.py --json`): the first and the repeated
  call of creating the states, for `pmap2_new_states`, the hand-written
  `jax.jit(jax.shard_map(...))` and brainstate's `pmap2_new_states`.

A file that is missing is left out of the figure (and said so). A file whose `source`
says it was transcribed (figures copied from a report, not written by the script) is
marked so in its panel's title.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys


ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
OUT = ROOT / "docs" / "figures" / "performance.png"
FLOOR = "jax.jit (floor)"
STEP_VARIANTS = ("eqx.filter_jit", "eqx.filter_pmap", "pmap2")
COLORS = {
    "eqx.filter_jit": "tab:gray",
    "eqx.filter_pmap": "tab:orange",
    "pmap2": "tab:blue",
    "a": "tab:blue",
    "b": "tab:gray",
    "c": "tab:red",
}
INIT_LABELS = {
    "a": "pmap2_new_states",
    "b": "jit(shard_map) by hand",
    "c": "brainstate",
}


def load(path: pathlib.Path) -> dict | None:
    if not path.exists():
        print(f"{path}: not found, left out of the figure")
        return None
    with open(path) as f:
        return json.load(f)


def _transcribed(results: dict) -> bool:
    return results.get("source", "").startswith("transcribed")


def _date(results: dict) -> str:
    return str(results.get("date", "?"))[:10]


def step_title(results: dict) -> str:
    m = results["machine"]
    if m.get("backend") == "gpu":
        where = f"{m.get('device_count')} {m.get('device_kind')} GPU"
    else:
        where = f"{m.get('device_count')} CPU devices, {m.get('cpu_cores')} cores"
    jax_version = str(m.get("jax", "?")).split()[0]
    note = ", transcribed" if _transcribed(results) else ""
    return f"Per training step, {where}\n(JAX {jax_version}, {_date(results)}{note})"


def plot_steps(ax, results: dict) -> None:
    """Grouped bars: per size, the ratio of each variant's time per step to the floor."""
    sizes = list(results["sizes"])
    width = 0.8 / len(STEP_VARIANTS)
    top = 1.0
    for j, v in enumerate(STEP_VARIANTS):
        xs, ys = [], []
        for i, size in enumerate(sizes):
            row = results["sizes"][size]["variants"].get(v, {})
            ratio = row.get("step_ratio")
            if ratio is None:
                continue
            xs.append(i + (j - (len(STEP_VARIANTS) - 1) / 2) * width)
            ys.append(ratio)
        bars = ax.bar(xs, ys, width, color=COLORS[v], label=v)
        ax.bar_label(bars, fmt="%.2fx", fontsize=7, padding=1)
        top = max([top, *ys])
    ax.axhline(
        1.0, color="black", linewidth=0.8, linestyle="--", label="jax.jit (floor) = 1"
    )
    ax.set_xticks(
        range(len(sizes)),
        [f"{size}\n{results['sizes'][size]['n_params']:,} params" for size in sizes],
        fontsize=8,
    )
    ax.set_ylim(0, top * 1.45)
    ax.set_ylabel("time per step / floor's", fontsize=8)
    ax.set_title(step_title(results), fontsize=9)
    ax.tick_params(axis="y", labelsize=8)
    ax.legend(fontsize=7, loc="upper left", ncol=2)


def plot_init(ax, results: dict) -> None:
    """Bars on a log scale: the first and the repeated call of each variant."""
    s = results["settings"]
    calls = (("first_call_s", "first call"), ("repeated_s", "repeated call"))
    variants = [v for v in ("a", "b", "c") if v in results["variants"]]
    width = 0.8 / len(variants)
    for j, v in enumerate(variants):
        row = results["variants"][v]
        xs, ys = [], []
        for i, (key, _) in enumerate(calls):
            if row.get(key) is not None:
                xs.append(i + (j - (len(variants) - 1) / 2) * width)
                ys.append(row[key])
        bars = ax.bar(xs, ys, width, color=COLORS[v], label=INIT_LABELS[v])
        ax.bar_label(bars, fmt="%.3g s", fontsize=7, padding=1)
    ax.set_yscale("log")
    ax.set_ylim(top=ax.get_ylim()[1] * 8)
    ax.set_xticks(range(len(calls)), [label for _, label in calls], fontsize=8)
    ax.set_ylabel("seconds (log scale)", fontsize=8)
    ax.tick_params(axis="y", labelsize=8)
    note = ", transcribed" if _transcribed(results) else ""
    shape = "x".join(map(str, s["shape"]))
    ax.set_title(
        f"Creating {s['states']} states of {shape} per device,\n"
        f"{s['devices']} CPU devices ({_date(results)}{note})",
        fontsize=9,
    )
    ax.legend(fontsize=7, loc="upper left")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        description="The benchmarks' results as one figure (docs/figures/performance.png)."
    )
    p.add_argument(
        "--results",
        type=pathlib.Path,
        default=RESULTS,
        help="folder of the JSON files (benchmarks/results)",
    )
    p.add_argument(
        "--out",
        type=pathlib.Path,
        default=OUT,
        help="the image to write (docs/figures/performance.png)",
    )
    args = p.parse_args(argv)

    import matplotlib  # pyright: ignore[reportMissingImports]

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt  # pyright: ignore[reportMissingImports]

    panels = []
    for name in ("bench_train_cpu.json", "bench_train_gpu.json"):
        results = load(args.results / name)
        if results is not None:
            panels.append((plot_steps, results))
    results = load(args.results / "bench_init_cpu.json")
    if results is not None:
        panels.append((plot_init, results))
    if not panels:
        print("No results to plot.")
        return 1

    fig, axes = plt.subplots(
        1, len(panels), figsize=(4.2 * len(panels), 3.8), dpi=100, layout="constrained"
    )
    for ax, (plot, results) in zip(
        axes if len(panels) > 1 else [axes], panels, strict=True
    ):
        plot(ax, results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    plt.close(fig)
    print(f"figure written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
