"""Runs a script as several JAX processes on this machine, as one distributed run.

Usage:

```sh
python -m eqx_pmapstate.launch --processes 2 --local-devices 4 script.py [args ...]
```

Each process runs `python script.py args ...` with the environment variables that
`eqx_pmapstate.initialize_distributed()` reads to join the others (a coordinator on a
free localhost port, the number of processes, this process's index and its number of
CPU devices), and `JAX_PLATFORMS=cpu` unless `--platform` says otherwise. The script
calls `eqx_pmapstate.initialize_distributed()` before any other use of JAX; run on its
own, the same script runs as a single process.

Each line a process writes is printed with the prefix `[process i] `, on the
launcher's stdout or stderr as the process wrote it. The launcher exits with 0 when
every process exits with 0. As soon as one fails, it stops the others (SIGTERM, then
SIGKILL after a few seconds), says which one failed and how, and exits with that
process's status (or 1 if it was killed by a signal). `--timeout SECONDS` stops
everything after that long and exits with 124. Ctrl-C (SIGINT), or SIGTERM or SIGHUP
sent to the launcher, stops every process too; each runs in its own process group, so
whatever it started is stopped with it.

Options:

- `--processes N` (default 2): how many processes to start.
- `--local-devices K` (default 1): the number of CPU devices of each process.
- `--platform NAME` (default `cpu`): the processes' `JAX_PLATFORMS`; an empty string
    keeps the launcher's own environment.
- `--timeout SECONDS`: stop everything, and fail, after this long.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence


GRACE_SECONDS = 5.0
POLL_SECONDS = 0.05
TIMEOUT_STATUS = 124
READER_JOIN_SECONDS = 5.0
LAUNCHER_PREFIX = "[launch] "
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_environment(
    base, coordinator: str, processes: int, index: int, local_devices: int, platform
) -> dict[str, str]:
    """The environment of process `index`: the launcher's, plus what it needs to join."""
    env = dict(base)
    env["EQX_PMAPSTATE_COORDINATOR"] = coordinator
    env["EQX_PMAPSTATE_NUM_PROCESSES"] = str(processes)
    env["EQX_PMAPSTATE_PROCESS_ID"] = str(index)
    env["EQX_PMAPSTATE_LOCAL_DEVICES"] = str(local_devices)
    env.setdefault("PYTHONUNBUFFERED", "1")  # lines arrive as they are printed
    if platform:
        env["JAX_PLATFORMS"] = platform
    return env


def _write(stream, data: bytes, lock: threading.Lock) -> None:
    with lock:
        buffer = getattr(stream, "buffer", None)
        if buffer is None:
            stream.write(data.decode(errors="replace"))
        else:
            buffer.write(data)
        stream.flush()


def _forward(pipe, stream, prefix: bytes, lock: threading.Lock) -> None:
    """Copies `pipe` to `stream` one whole line at a time, each after `prefix`. If
    `stream` breaks (a closed pipe), the rest is read and dropped, so that the
    process never blocks on a full pipe."""
    broken = False
    with pipe:
        for line in iter(pipe.readline, b""):
            if not line.endswith(b"\n"):
                line += b"\n"
            if not broken:
                try:
                    _write(stream, prefix + line, lock)
                except (OSError, ValueError):  # a closed pipe or file
                    broken = True


def _say(message: str, lock: threading.Lock) -> None:
    _write(sys.stderr, (LAUNCHER_PREFIX + message + "\n").encode(), lock)


def start(index: int, command: Sequence[str], env, lock: threading.Lock):
    """Starts process `index` in its own process group, with threads forwarding its
    output. Returns the process and the threads."""
    process = subprocess.Popen(
        command,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    prefix = f"[process {index}] ".encode()
    threads = [
        threading.Thread(
            target=_forward, args=(pipe, stream, prefix, lock), daemon=True
        )
        for pipe, stream in ((process.stdout, sys.stdout), (process.stderr, sys.stderr))
    ]
    for thread in threads:
        thread.start()
    return process, threads


def describe_status(returncode: int) -> str:
    """`exited with status 3`, or `was killed by SIGKILL`."""
    if returncode >= 0:
        return f"exited with status {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"was killed by {name}"


def first_failure(processes) -> int | None:
    """The index of a process that has ended with a non-zero status, if any."""
    for index, process in enumerate(processes):
        if process.poll() not in (None, 0):
            return index
    return None


def _signal_groups(processes, sig: signal.Signals) -> None:
    for process in processes:
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass  # the group is gone already


def stop(processes, grace: float = GRACE_SECONDS) -> None:
    """Stops every process and its group: SIGTERM, then SIGKILL after `grace`
    seconds; returns once each process has been waited for."""
    _signal_groups(processes, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(p.poll() is None for p in processes):
        time.sleep(POLL_SECONDS)
    _signal_groups(processes, signal.SIGKILL)  # also whatever they left behind
    for process in processes:
        process.wait()


def _catch_stop_signals(received: list) -> dict:
    """Makes SIGINT, SIGTERM and SIGHUP append their number to `received`; returns
    the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        return {}

    def handler(signum, frame):
        received.append(signum)

    return {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}


def _restore_handlers(previous: dict) -> None:
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def supervise(processes, timeout: float | None, received: list, lock) -> int:
    """Waits until every process has succeeded, one has failed, `timeout` has passed
    or a signal has been `received`; stops the others in the last three cases. Returns
    the status for the launcher to exit with."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        failed = first_failure(processes)
        if failed is not None:
            returncode = processes[failed].returncode
            _say(
                f"process {failed} {describe_status(returncode)}; stopping the others",
                lock,
            )
            stop(processes)
            return returncode if returncode > 0 else 1
        if all(p.poll() == 0 for p in processes):
            return 0
        if deadline is not None and time.monotonic() > deadline:
            _say(f"timed out after {timeout:g} s; stopping every process", lock)
            stop(processes)
            return TIMEOUT_STATUS
        if received:
            name = signal.Signals(received[0]).name
            _say(f"received {name}; stopping every process", lock)
            stop(processes)
            return 128 + received[0]
        time.sleep(POLL_SECONDS)


def run(
    script: str,
    args: Sequence[str] = (),
    *,
    processes: int = 2,
    local_devices: int = 1,
    platform: str = "cpu",
    timeout: float | None = None,
) -> int:
    """Runs `script` with `args` as `processes` processes of one distributed run,
    and returns the status for the launcher to exit with (see the module's docstring).
    """
    coordinator = f"127.0.0.1:{free_port()}"
    command = [sys.executable, script, *args]
    lock = threading.Lock()
    received = []
    previous = _catch_stop_signals(received)
    started = []
    try:
        for index in range(processes):
            env = child_environment(
                os.environ, coordinator, processes, index, local_devices, platform
            )
            started.append(start(index, command, env, lock))
        status = supervise([p for p, _ in started], timeout, received, lock)
    finally:
        stop([p for p, _ in started if p.poll() is None])
        _restore_handlers(previous)
    for _, threads in started:
        for thread in threads:
            thread.join(READER_JOIN_SECONDS)
    return status


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m eqx_pmapstate.launch",
        description="Run a script as several JAX processes on this machine.",
    )
    parser.add_argument("--processes", type=_positive_int, default=2)
    parser.add_argument("--local-devices", type=_positive_int, default=1)
    parser.add_argument(
        "--platform",
        default="cpu",
        help="JAX_PLATFORMS of the processes; '' keeps the launcher's environment",
    )
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS")
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    options = _parser().parse_args(argv)
    return run(
        options.script,
        options.args,
        processes=options.processes,
        local_devices=options.local_devices,
        platform=options.platform,
        timeout=options.timeout,
    )


if __name__ == "__main__":
    sys.exit(main())
