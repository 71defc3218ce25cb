"""What the benchmark scripts share: the devices JAX runs on, the fresh child processes
that time a first call, interleaved timing, and the machine block of the JSON records.

The scripts run as `python benchmarks/NAME.py`, so this file is imported as `_harness`.
It imports only the standard library at the top: JAX is imported by the functions that
need it, after `use_devices` has chosen the platform and the CPU device count (which
must happen before JAX's backend starts, that is before its first computation or
`jax.devices()`).

- `platform_from_argv(argv)` reads `--gpu`, `--platform` and `--devices` from the
  command line before the script's own parser runs; `use_devices(platform, n)` sets JAX
  up for them (on CPU, `jax.config.update("jax_num_cpu_devices", n)`).
- `run_child(argv, ...)` runs `python argv...` (the script again, with arguments that
  say what to time) and reads back the one line that the child writes with `report`:
  `BENCH_RESULT {json}`. `Clock` measures the wall time and the process's CPU time
  (all its threads) of a span, for the child to report.
- `interleaved(runs, rounds, per_round)` takes turns between variants round by round;
  `median_spread(times)` gives the median and the interquartile range over the median.
- `record(benchmark, command_argv)` is the head of every JSON record: the benchmark's
  name, the date, the command and `machine()` (Python, platform, cores, load average at
  the start, JAX's backend and devices, and the versions of jax, jaxlib, equinox, optax
  and eqx_pmapstate); `write_json(path, record)` writes it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from importlib import metadata


MARK = "BENCH_RESULT "
N_CPU_DEVICES = 8

# When this module is first imported, that is when the script starts.
STARTED = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
LOAD_AT_START = round(os.getloadavg()[0], 2)


# --------------------------------------------------------------------------- devices


def platform_from_argv(
    argv: Sequence[str], devices: int = N_CPU_DEVICES
) -> tuple[str, int]:
    """`("gpu" or "cpu", n_devices)` from `--gpu`, `--platform cpu|gpu` and `--devices
    N` in `argv` (the script's own parser reads them again later, with their help)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--gpu", action="store_true")
    p.add_argument("--platform", choices=("cpu", "gpu"), default="cpu")
    p.add_argument("--devices", type=int, default=devices)
    known, _ = p.parse_known_args(list(argv))
    return ("gpu" if known.gpu else known.platform), known.devices


def use_devices(platform_name: str, devices: int = N_CPU_DEVICES) -> None:
    """Sets JAX up for `platform_name`: on `"cpu"`, `devices` CPU devices and no other
    platform; on `"gpu"`, the accelerators JAX finds (the device count is theirs).
    Call it before JAX's backend starts (before any JAX computation)."""
    import jax

    if platform_name == "cpu":
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", devices)


# --------------------------------------------------------------------------- children


class Clock:
    """`with Clock() as c: ...`, then `c.wall` and `c.cpu`: the span's wall time and the
    CPU time of this process (all its threads; on a small shared machine it is less
    disturbed by other processes than wall time), in seconds."""

    wall: float
    cpu: float

    def __enter__(self) -> Clock:
        self._cpu0, self._wall0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.wall = time.perf_counter() - self._wall0
        self.cpu = time.process_time() - self._cpu0


def error_text(e: BaseException) -> str:
    """`"TypeName: message"`, for a result that failed."""
    text = str(e).strip() or repr(e)
    return f"{type(e).__name__}: {text}"


def report(result: dict) -> None:
    """The child's answer: one marked JSON line on stdout, read by `run_child`."""
    print(MARK + json.dumps(result), flush=True)


def run_child(
    argv: Sequence[str],
    timeout: float,
    python: str | None = None,
    tail: int = 10,
    sep: str = " | ",
) -> dict:
    """Runs `python *argv` (this interpreter by default) and returns the dict its
    `report` line carries; else `{"error": ...}` with the exit code and the last `tail`
    lines of its output joined by `sep`, or `{"skipped": ...}` if `python` does not
    exist."""
    cmd = [python or sys.executable, *argv]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        return {"skipped": f"the interpreter {cmd[0]!r} was not found"}
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    for line in proc.stdout.splitlines():
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    lines = (proc.stderr or proc.stdout).strip().splitlines()[-tail:]
    return {"error": f"exit code {proc.returncode}: " + sep.join(lines)}


# --------------------------------------------------------------------------- timing


def interleaved(
    runs: Mapping[str, Callable[[], object]], rounds: int, per_round: int = 1
) -> dict[str, list[float]]:
    """Seconds per unit of work of each run, one entry per round: every round calls
    each run once, in turn, so that a slow spell of the machine hits all of them. The
    order rotates from round to round, so that each run follows each other one as
    often (a run that follows a heavy one finds the processor's caches cold). A run
    does `per_round` units (calls, steps) and waits for its results before it returns."""
    names = list(runs)
    times: dict[str, list[float]] = {name: [] for name in names}
    for i in range(rounds):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            runs[name]()
            times[name].append((time.perf_counter() - t0) / per_round)
    return times


def median_spread(times: Sequence[float]) -> tuple[float, float]:
    """The median of `times` and their interquartile range divided by the median."""
    median = statistics.median(times)
    if len(times) < 2:
        return median, 0.0
    q1, _, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return median, (q3 - q1) / median


# --------------------------------------------------------------------------- the record


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def library() -> str:
    """Which eqx_pmapstate is measured (its version and folder), or why it cannot be
    imported."""
    try:
        import eqx_pmapstate
    except Exception as e:  # noqa: BLE001 - said in the record, not raised
        return f"eqx_pmapstate not importable: {error_text(e)}"
    where = os.path.dirname(os.path.dirname(os.path.abspath(eqx_pmapstate.__file__)))
    return f"eqx_pmapstate {eqx_pmapstate.__version__} from {where}"


def versions() -> dict[str, str | None]:
    """The versions of jax, jaxlib, equinox, optax and eqx_pmapstate (None: not
    installed). eqx_pmapstate's is the one imported, which may be a working tree's."""
    out = {p: _version(p) for p in ("jax", "jaxlib", "equinox", "optax")}
    try:
        import eqx_pmapstate

        out["eqx_pmapstate"] = eqx_pmapstate.__version__
    except Exception:  # noqa: BLE001 - `library()` says why
        out["eqx_pmapstate"] = None
    return out


def machine() -> dict:
    """What the numbers were measured on (this starts JAX's backend)."""
    import jax

    device = jax.devices()[0]
    return {
        **versions(),
        "library": library(),
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "device_count": jax.device_count(),
        "device_kind": device.device_kind,
        "cpu_cores": os.cpu_count(),
        "platform": platform.platform(),
        "load_average_at_start": LOAD_AT_START,
    }


def describe_machine(m: dict) -> str:
    """`machine()` in one line, for the top of a script's output."""
    return (
        f"JAX {m['jax']}, backend {m['backend']}, {m['device_count']} device(s) "
        f"({m['device_kind']}), {m['cpu_cores']} cores, load average "
        f"{m['load_average_at_start']:.2f}; equinox {m['equinox']}, optax "
        f"{m['optax']}; {m['library']}"
    )


def record(benchmark: str, script: str, argv: Sequence[str]) -> dict:
    """The head of a JSON record: `benchmark`, `source`, `date` (when the script
    started), `command` (`script` and its arguments `argv`) and `machine`."""
    return {
        "benchmark": benchmark,
        "source": f"measured: written by {script} --json",
        "date": STARTED,
        "command": " ".join([script, *argv]),
        "machine": machine(),
    }


def write_json(path: str, results: dict) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(results, f, indent=2)
        f.write("\n")
    print(f"results written to {path}")
