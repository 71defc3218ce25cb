"""`python -m eqx_pmapstate.launch` and `eqx_pmapstate.initialize_distributed`."""

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import jax
import pytest

import eqx_pmapstate as ep


LAUNCHER_VARIABLES = (
    "EQX_PMAPSTATE_COORDINATOR",
    "EQX_PMAPSTATE_NUM_PROCESSES",
    "EQX_PMAPSTATE_PROCESS_ID",
    "EQX_PMAPSTATE_LOCAL_DEVICES",
)

# Each throwaway script knows its index from the launcher's variable, and `pid_file`
# writes this process's pid where the test can read it.
PRELUDE = """\
import os, sys, time
INDEX = int(os.environ["EQX_PMAPSTATE_PROCESS_ID"])

def pid_file(pid, name="pid"):
    path = f"{name}{INDEX}.txt"
    with open(path + ".tmp", "w") as f:
        f.write(str(pid))
    os.replace(path + ".tmp", path)

def wait_for(path):
    while not os.path.exists(path):
        time.sleep(0.02)
"""


def _script(tmp_path, body: str) -> str:
    path = tmp_path / "script.py"
    path.write_text(PRELUDE + textwrap.dedent(body))
    return str(path)


def _command(*args) -> list:
    return [sys.executable, "-m", "eqx_pmapstate.launch", *map(str, args)]


def _launch(tmp_path, *args, timeout=60, env=None):
    return subprocess.run(
        _command(*args),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead too, waiting for a parent that is not ours to reap it
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _pids(tmp_path, name="pid") -> list:
    return [int(p.read_text()) for p in sorted(tmp_path.glob(f"{name}*.txt"))]


def _gone(pids, within=5.0) -> bool:
    deadline = time.monotonic() + within
    while any(_alive(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    return not any(_alive(p) for p in pids)


# --------------------------------------------------------------------------- output


def test_output_arrives_prefixed_by_process_line_by_line(tmp_path):
    script = _script(
        tmp_path,
        """
        for k in range(200):
            print(f"line {k} from {INDEX}")
        print(f"error from {INDEX}", file=sys.stderr)
        sys.stdout.write(f"last from {INDEX}")  # no newline at the end
        """,
    )
    result = _launch(tmp_path, "--processes", 2, script)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2 * 201
    for line in lines:
        match = re.fullmatch(r"\[process (\d)\] (line \d+|last) from (\d)", line)
        assert match is not None, line
        assert match.group(1) == match.group(3)
    for i in (0, 1):
        ours = [line for line in lines if line.startswith(f"[process {i}] ")]
        assert ours == [f"[process {i}] line {k} from {i}" for k in range(200)] + [
            f"[process {i}] last from {i}"
        ]
        assert f"[process {i}] error from {i}" in result.stderr.splitlines()


def test_exit_zero_when_every_process_succeeds(tmp_path):
    script = _script(tmp_path, "print('ok', INDEX)\n")
    result = _launch(tmp_path, "--processes", 3, script)
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.splitlines()) == [
        f"[process {i}] ok {i}" for i in range(3)
    ]
    assert "[launch]" not in result.stderr


def test_arguments_reach_the_script(tmp_path):
    script = _script(tmp_path, "print(sys.argv[1:])\n")
    result = _launch(tmp_path, "--processes", 1, script, "--flag", "a b")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[process 0] ['--flag', 'a b']\n"


def test_environment_reaches_the_processes(tmp_path):
    script = _script(
        tmp_path,
        """
        import json
        names = %r + ("JAX_PLATFORMS", "EQX_TEST_MARKER")
        print(json.dumps({name: os.environ.get(name) for name in names}))
        """
        % (LAUNCHER_VARIABLES,),
    )
    env = dict(os.environ, EQX_TEST_MARKER="kept", JAX_PLATFORMS="cpu")
    result = _launch(tmp_path, "--processes", 2, "--local-devices", 3, script, env=env)
    assert result.returncode == 0, result.stderr
    seen = {}
    for line in result.stdout.splitlines():
        match = re.fullmatch(r"\[process (\d)\] (.*)", line)
        assert match is not None, line
        seen[int(match.group(1))] = json.loads(match.group(2))
    assert set(seen) == {0, 1}
    address = seen[0]["EQX_PMAPSTATE_COORDINATOR"]
    assert re.fullmatch(r"127\.0\.0\.1:\d+", address)
    for i in (0, 1):
        assert seen[i] == {
            "EQX_PMAPSTATE_COORDINATOR": address,
            "EQX_PMAPSTATE_NUM_PROCESSES": "2",
            "EQX_PMAPSTATE_PROCESS_ID": str(i),
            "EQX_PMAPSTATE_LOCAL_DEVICES": "3",
            "JAX_PLATFORMS": "cpu",
            "EQX_TEST_MARKER": "kept",
        }
    other = _launch(tmp_path, "--processes", 1, "--platform", "tpu", script, env=env)
    assert json.loads(other.stdout.split("] ", 1)[1])["JAX_PLATFORMS"] == "tpu"
    kept = _launch(tmp_path, "--processes", 1, "--platform", "", script, env=env)
    assert json.loads(kept.stdout.split("] ", 1)[1])["JAX_PLATFORMS"] == "cpu"


# --------------------------------------------------------------------------- failures


def test_a_failing_process_stops_the_others(tmp_path):
    script = _script(
        tmp_path,
        """
        import subprocess
        if INDEX == 0:
            child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
            pid_file(child.pid, "grandchild")
            pid_file(os.getpid())
            time.sleep(60)
        else:
            wait_for("pid0.txt")
            sys.exit(3)
        """,
    )
    start = time.monotonic()
    result = _launch(tmp_path, "--processes", 2, script, timeout=30)
    elapsed = time.monotonic() - start
    assert result.returncode == 3
    assert elapsed < 15
    assert "[launch] process 1 exited with status 3; stopping the others" in (
        result.stderr.splitlines()
    )
    (pid,) = _pids(tmp_path)
    (grandchild,) = _pids(tmp_path, "grandchild")
    assert not _alive(pid)  # stopped and waited for by the launcher
    assert _gone([grandchild])  # its process group was stopped with it


def test_a_killed_process_is_a_failure(tmp_path):
    script = _script(
        tmp_path,
        """
        import signal
        if INDEX == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)
        """,
    )
    start = time.monotonic()
    result = _launch(tmp_path, "--processes", 2, script, timeout=30)
    assert time.monotonic() - start < 15
    assert result.returncode == 1
    assert "[launch] process 1 was killed by SIGKILL; stopping the others" in (
        result.stderr
    )


def test_timeout_stops_everything(tmp_path):
    script = _script(tmp_path, "pid_file(os.getpid())\ntime.sleep(60)\n")
    start = time.monotonic()
    result = _launch(tmp_path, "--processes", 2, "--timeout", 2, script, timeout=30)
    assert 2 <= time.monotonic() - start < 15
    assert result.returncode == 124
    assert "[launch] timed out after 2 s; stopping every process" in result.stderr
    pids = _pids(tmp_path)
    assert len(pids) == 2
    assert not any(_alive(p) for p in pids)


def test_a_process_that_ignores_sigterm_is_killed(tmp_path):
    script = _script(
        tmp_path,
        """
        import signal
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        pid_file(os.getpid())
        time.sleep(60)
        """,
    )
    result = _launch(tmp_path, "--processes", 1, "--timeout", 1, script, timeout=30)
    assert result.returncode == 124
    assert not any(_alive(p) for p in _pids(tmp_path))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_the_launcher_stops_the_processes(tmp_path, sig):
    script = _script(tmp_path, "pid_file(os.getpid())\ntime.sleep(60)\n")
    launcher = subprocess.Popen(
        _command("--processes", 2, script),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while len(_pids(tmp_path)) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(_pids(tmp_path)) == 2
        launcher.send_signal(sig)
        _, stderr = launcher.communicate(timeout=30)
    finally:
        launcher.kill()
        launcher.communicate()
    assert launcher.returncode == 128 + sig
    assert f"[launch] received {sig.name}; stopping every process" in stderr
    assert not any(_alive(p) for p in _pids(tmp_path))


def test_bad_arguments_are_refused(tmp_path):
    result = _launch(tmp_path, "--processes", 0, "script.py")
    assert result.returncode == 2
    assert "must be at least 1, not 0" in result.stderr


# --------------------------------------------------------------------------- JAX


PSUM = """
import eqx_pmapstate as ep

assert ep.initialize_distributed() is True
import jax
import numpy as np
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

assert (jax.process_count(), jax.device_count(), jax.local_device_count()) == (2, 4, 2)
mesh = jax.make_mesh((4,), ("d",), axis_types=(AxisType.Auto,), devices=jax.devices())
values = np.arange(1.0, 5.0, dtype=np.float32)  # device k holds k + 1
x = jax.make_array_from_callback((4,), NamedSharding(mesh, P("d")), lambda i: values[i])
total = jax.jit(
    jax.shard_map(lambda v: jax.lax.psum(v, "d"), mesh=mesh, in_specs=P("d"), out_specs=P())
)(x)
print("sum", float(np.asarray(total.addressable_data(0))[0]), "on", jax.process_index())
"""


def test_psum_over_the_devices_of_two_processes(tmp_path):
    script = tmp_path / "psum.py"
    script.write_text(PSUM)
    result = _launch(tmp_path, "--processes", 2, "--local-devices", 2, script)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = set(result.stdout.splitlines())
    assert {"[process 0] sum 10.0 on 0", "[process 1] sum 10.0 on 1"} <= lines


def test_an_uncaught_exception_ends_a_joined_process_at_once(tmp_path):
    # Without the hook, process 1 would wait at exit (JAX's shutdown barrier, 300 s)
    # for process 0, which sleeps.
    script = tmp_path / "raises.py"
    script.write_text(
        "import time\n"
        "import eqx_pmapstate as ep\n"
        "assert ep.initialize_distributed()\n"
        "import jax\n"
        "if jax.process_index() == 1:\n"
        "    raise ValueError('boom')\n"
        "time.sleep(60)\n"
    )
    start = time.monotonic()
    result = _launch(tmp_path, "--processes", 2, script, timeout=60)
    assert time.monotonic() - start < 30
    assert result.returncode == 1
    assert "[process 1] ValueError: boom" in result.stderr
    assert "[launch] process 1 exited with status 1; stopping the others" in (
        result.stderr
    )


def test_a_joined_process_still_ends_on_sigterm(tmp_path):
    # JAX's preemption service would catch the SIGTERM the launcher stops processes
    # with, and the process would carry on until the timeout.
    script = tmp_path / "term.py"
    script.write_text(
        "import os, signal, time\n"
        "import eqx_pmapstate as ep\n"
        "assert ep.initialize_distributed()\n"
        "import jax\n"
        "if jax.process_index() == 0:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(60)\n"
    )
    result = _launch(tmp_path, "--processes", 2, "--timeout", 30, script, timeout=60)
    assert result.returncode == 1, result.stderr
    assert "[launch] process 0 was killed by SIGTERM; stopping the others" in (
        result.stderr
    )


def test_initialize_on_its_own_returns_false(monkeypatch):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert ep.initialize_distributed() is False
    assert not jax.distributed.is_initialized()
    # the device count already in force is no conflict
    assert ep.initialize_distributed(local_devices=8) is False
    assert not jax.distributed.is_initialized()


def test_initialize_on_its_own_sets_the_device_count(tmp_path):
    script = tmp_path / "alone.py"
    script.write_text(
        "import eqx_pmapstate as ep\n"
        "print(ep.initialize_distributed(local_devices=3))\n"
        "import jax\n"
        "print(jax.device_count(), jax.process_count(), jax.distributed.is_initialized())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["False", "3 1 False"]


def test_initialize_after_the_backend_started_says_what_to_do(monkeypatch):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(RuntimeError, match="set the number of CPU devices to 3") as e:
        ep.initialize_distributed(local_devices=3)
    assert "at the top of the script" in str(e.value)
    assert "before any other use of JAX" in str(e.value)

    monkeypatch.setenv("EQX_PMAPSTATE_COORDINATOR", "127.0.0.1:1")
    monkeypatch.setenv("EQX_PMAPSTATE_NUM_PROCESSES", "2")
    monkeypatch.setenv("EQX_PMAPSTATE_PROCESS_ID", "0")
    monkeypatch.setenv("EQX_PMAPSTATE_LOCAL_DEVICES", "8")
    with pytest.raises(RuntimeError, match="join the other processes") as e:
        ep.initialize_distributed()
    assert "at the top of the script" in str(e.value)
    assert not jax.distributed.is_initialized()


def test_initialize_refuses_some_of_the_variables(monkeypatch):
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("EQX_PMAPSTATE_PROCESS_ID", "0")
    with pytest.raises(ValueError, match="EQX_PMAPSTATE_COORDINATOR"):
        ep.initialize_distributed()
    monkeypatch.setenv("EQX_PMAPSTATE_COORDINATOR", "127.0.0.1:1")
    monkeypatch.setenv("EQX_PMAPSTATE_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="`EQX_PMAPSTATE_NUM_PROCESSES` is 'two'"):
        ep.initialize_distributed()
    assert not jax.distributed.is_initialized()
