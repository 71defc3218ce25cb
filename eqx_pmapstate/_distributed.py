"""Joining the processes started by `python -m eqx_pmapstate.launch`."""

from __future__ import annotations

import os
import sys
from typing import NamedTuple

import jax

from ._jax_compat import backends_are_initialized


COORDINATOR = "EQX_PMAPSTATE_COORDINATOR"
NUM_PROCESSES = "EQX_PMAPSTATE_NUM_PROCESSES"
PROCESS_ID = "EQX_PMAPSTATE_PROCESS_ID"
LOCAL_DEVICES = "EQX_PMAPSTATE_LOCAL_DEVICES"
REQUIRED = (COORDINATOR, NUM_PROCESSES, PROCESS_ID)


class Launch(NamedTuple):
    """What the launcher told this process, read from its environment."""

    coordinator: str
    num_processes: int
    process_id: int
    local_devices: int | None


def _int_variable(name: str, value: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise ValueError(
            f"The environment variable `{name}` is {value!r}, which is not an "
            "integer. It is set by `python -m eqx_pmapstate.launch`; start the "
            "script with the launcher, or unset the variable to run it on its own."
        ) from None


def launch_environment(environ=None) -> Launch | None:
    """The launcher's settings for this process, or `None` if it was not launched."""
    environ = os.environ if environ is None else environ
    present = [name for name in REQUIRED if name in environ]
    if not present:
        return None
    missing = [name for name in REQUIRED if name not in environ]
    if missing:
        raise ValueError(
            f"Some of the launcher's environment variables are set ({present}) but "
            f"not all: {missing} are missing. Start the script with `python -m "
            "eqx_pmapstate.launch`, or unset them all to run it on its own."
        )
    local = environ.get(LOCAL_DEVICES)
    return Launch(
        coordinator=environ[COORDINATOR],
        num_processes=_int_variable(NUM_PROCESSES, environ[NUM_PROCESSES]),
        process_id=_int_variable(PROCESS_ID, environ[PROCESS_ID]),
        local_devices=None if local is None else _int_variable(LOCAL_DEVICES, local),
    )


def _too_late(what: str) -> RuntimeError:
    return RuntimeError(
        f"`eqx_pmapstate.initialize_distributed` must {what}, but JAX's backend is "
        "already initialised: something in this process has already run a JAX "
        "computation or asked for its devices (`jax.devices()`, `jnp.zeros`, ...). "
        "Call `eqx_pmapstate.initialize_distributed()` at the top of the script, "
        "right after the imports and before any other use of JAX."
    )


def _set_cpu_device_count(count: int) -> None:
    if count < 1:
        raise ValueError(f"`local_devices` must be at least 1, not {count}.")
    if backends_are_initialized():
        if jax.local_device_count(backend="cpu") == count:
            return  # already so
        raise _too_late(f"set the number of CPU devices to {count}")
    jax.config.update("jax_num_cpu_devices", count)


def _without_preemption_service() -> None:
    """Keeps SIGTERM deadly. JAX's preemption service catches it, to let a process
    that cloud machines are taking back save its work at an agreed step; the launcher
    sends it to stop a process, which must then end, not carry on."""
    try:
        jax.config.update("jax_enable_preemption_service", False)
    except AttributeError:  # pragma: no cover - a JAX without the option
        pass


def _exit_after(hook):
    """Wraps `sys.excepthook` so that an uncaught exception ends the process at once.

    A process of a distributed run that ends normally first waits, in JAX's shutdown
    barrier, for every other process to end too; after an uncaught exception the
    others may be waiting for it in a collective, and neither side would move until a
    timeout. Ending at once (status 1) lets the launcher, or JAX's heartbeats, stop
    the others.
    """

    def excepthook(kind, value, traceback):
        try:
            hook(kind, value, traceback)
            for stream in (sys.stdout, sys.stderr):
                stream.flush()
        finally:
            os._exit(1)

    return excepthook


def initialize_distributed(
    *,
    local_devices: int | None = None,
    heartbeat_timeout_seconds: int = 10,
    timeout_seconds: int = 60,
    shutdown_timeout_seconds: int = 300,
) -> bool:
    """Joins this process to the others started by `python -m eqx_pmapstate.launch`,
    and does nothing to the distributed runtime when the script runs on its own, so
    that the same script works both ways.

    Call it at the top of the script, before any JAX computation:

    ```python
    import eqx_pmapstate as ep

    ep.initialize_distributed()  # True under the launcher, False on its own
    ```

    Under the launcher (which sets `EQX_PMAPSTATE_COORDINATOR`,
    `EQX_PMAPSTATE_NUM_PROCESSES`, `EQX_PMAPSTATE_PROCESS_ID` and
    `EQX_PMAPSTATE_LOCAL_DEVICES`), this sets the number of CPU devices of this
    process and calls `jax.distributed.initialize`; afterwards `jax.devices()` lists
    the devices of every process, and collectives such as `jax.lax.psum` span them
    all. So that no process waits for ever on a dead one: a process whose peer stops
    sending heartbeats ends with an error after `heartbeat_timeout_seconds` (at once
    when the dead one is process 0, which holds the coordinator); an uncaught
    exception ends this process as soon as its traceback is printed, without running
    `atexit` handlers (at a normal exit it would first wait for every other process
    to end); and SIGTERM ends it (JAX's preemption service, which would catch it, is
    switched off).

    **Arguments:**

    - `local_devices`: the number of CPU devices of this process. Defaults to the
        launcher's `--local-devices`; on its own, `None` leaves JAX's default. It has
        no effect on other platforms.
    - `heartbeat_timeout_seconds`: a process that has sent no heartbeat for this long
        is considered dead, and the others then fail instead of waiting for it.
    - `timeout_seconds`: how long to wait for all the processes to connect at start.
    - `shutdown_timeout_seconds`: how long a process that has finished waits at exit
        for the others to finish too. If they take longer, every process is stopped
        with an error, so this is long: a dead process is caught by the heartbeats.

    **Returns:**

    `True` if this process was started by the launcher and has joined the others,
    `False` if it runs on its own.

    !!! warning

        The device count and the distributed runtime can only be set before JAX's
        backend starts. If something has already run a JAX computation, or asked for
        `jax.devices()`, this raises a `RuntimeError`.
    """
    launch = launch_environment()
    if launch is not None and jax.distributed.is_initialized():
        return True  # a second call: the first one did the work
    if launch is not None and backends_are_initialized():
        raise _too_late("join the other processes of `eqx_pmapstate.launch`")
    if local_devices is None and launch is not None:
        local_devices = launch.local_devices
    if local_devices is not None:
        _set_cpu_device_count(local_devices)
    if launch is None:
        return False
    _without_preemption_service()
    jax.distributed.initialize(
        launch.coordinator,
        launch.num_processes,
        launch.process_id,
        cluster_detection_method="deactivate",
        coordinator_bind_address=launch.coordinator,
        initialization_timeout=timeout_seconds,
        heartbeat_timeout_seconds=heartbeat_timeout_seconds,
        shutdown_timeout_seconds=shutdown_timeout_seconds,
    )
    sys.excepthook = _exit_after(sys.excepthook)
    return True
