"""Several processes on one machine (`jax.distributed`, CPU collectives over gloo): the
example's training run gives the same parameters as one process, a killed process ends
the run in bounded time, and a restart from the checkpoint finishes bitwise equal."""

import os
import pathlib
import re
import subprocess
import sys
import textwrap
import time

import pytest

from eqx_pmapstate import launch


ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLE = str(ROOT / "examples" / "multihost.py")
CHECKSUM = re.compile(r"checksum: (\S+ \S+)")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _launch(*args, timeout=240):
    cmd = [sys.executable, "-m", "eqx_pmapstate.launch", "--processes", "2"]
    cmd += ["--local-devices", "4", "--timeout", str(timeout - 10), *args]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT
    )


def _checksums(output: str) -> list[str]:
    return CHECKSUM.findall(output)


AFRESH = "a new run in {} (--resume continues): removing 2 checkpoint(s)"


def _alone(directory):
    proc = subprocess.run(
        [sys.executable, EXAMPLE, "--checkpoint-dir", str(directory)],
        capture_output=True,
        text=True,
        timeout=240,
        env=_env(),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


@pytest.fixture(scope="module")
def alone(tmp_path_factory):
    """The uninterrupted run in one process of 8 devices, run twice in the same folder
    as a user reruns an example: the second run starts afresh, to the same result."""
    d = tmp_path_factory.mktemp("alone")
    first, second = _alone(d), _alone(d)
    assert AFRESH.format(d) not in first.stdout
    assert AFRESH.format(d) in second.stdout
    (value,) = _checksums(first.stdout)
    assert _checksums(second.stdout) == [value]
    assert sorted(p.name for p in d.iterdir()) == ["step_10", "step_20"]
    return value


def test_two_processes_train_as_one_does_and_again(alone, tmp_path):
    for run in range(2):  # the second run, in the same folder, starts afresh
        proc = _launch(EXAMPLE, "--checkpoint-dir", str(tmp_path))
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        values = _checksums(proc.stdout)
        assert len(values) == 2  # one line per process ...
        assert values == [alone, alone]  # ... the same, and as one process of 8 devices
        assert proc.stdout.count(AFRESH.format(tmp_path)) == run  # said by process 0
        assert sorted(p.name for p in tmp_path.iterdir()) == ["step_10", "step_20"]


def test_only_the_newest_checkpoints_are_kept(tmp_path):
    cmd = [sys.executable, EXAMPLE, "--checkpoint-dir", str(tmp_path), "--steps", "6"]
    cmd += ["--checkpoint-every", "2", "--keep", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_4", "step_6"]


def test_a_killed_process_ends_the_run_and_a_restart_finishes_it(alone, tmp_path):
    start = time.monotonic()
    died = _launch(EXAMPLE, "--checkpoint-dir", str(tmp_path), "--crash-at", "13")
    assert died.returncode != 0
    assert time.monotonic() - start < 120  # no hang
    assert "process 1 dies at step 13" in died.stdout
    assert not _checksums(died.stdout)
    assert (tmp_path / "step_10").is_dir() and not (tmp_path / "step_20").exists()
    resumed = _launch(EXAMPLE, "--checkpoint-dir", str(tmp_path), "--resume")
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert resumed.stdout.count("resumed from step 10, layout as made: True") == 2
    assert _checksums(resumed.stdout) == [alone, alone]  # bitwise: the bits' hash too


def test_a_survivor_without_the_launcher_fails_in_bounded_time(tmp_path):
    # Nobody stops the survivor here: JAX's heartbeats must.
    address = f"127.0.0.1:{launch.free_port()}"
    env = launch.child_environment(_env(), address, 2, 0, 4, "cpu")
    procs = []
    for i in range(2):
        env_i = dict(env, EQX_PMAPSTATE_PROCESS_ID=str(i))
        cmd = [sys.executable, EXAMPLE, "--checkpoint-dir", str(tmp_path)]
        cmd += ["--crash-at", "13", "--steps", "1000"]
        procs.append(
            subprocess.Popen(
                cmd, env=env_i, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
        )
    try:
        assert procs[1].wait(timeout=120) != 0  # it killed itself at step 13
        start = time.monotonic()
        code = procs[0].wait(timeout=90)
        assert code != 0  # the survivor failed ...
        assert time.monotonic() - start < 60  # ... after about the heartbeat timeout
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_a_replicated_state_that_differs_between_processes_is_an_error(tmp_path):
    script = tmp_path / "differ.py"
    script.write_text(
        textwrap.dedent(
            """
            import jax
            import eqx_pmapstate as ep
            ep.initialize_distributed()
            import jax.numpy as jnp
            value = float(jax.process_index())  # a constant, different per process
            try:
                ep.pmap2_new_states(lambda: {"w": ep.NonBatchState(jnp.full(3, value))})
            except ValueError as e:
                print("refused:", str(e)[:60])
            """
        )
    )
    proc = _launch(str(script), timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (
        proc.stdout.count("refused: The state(s) at ['w'].value are to be replicated")
        == 2
    )


def test_relayout_and_replicated_inputs_with_two_processes(tmp_path):
    # A tree taken to one device goes back into the layout (each process gives the
    # parts its devices hold); a replicated input that differs between the processes
    # is a `ValueError` naming it.
    script = tmp_path / "relayout.py"
    script.write_text(
        textwrap.dedent(
            """
            import jax
            import eqx_pmapstate as ep
            ep.initialize_distributed()
            import jax.numpy as jnp
            import numpy as np
            from eqx_pmapstate.filters import OfType
            model = ep.pmap2_new_states(
                lambda: {"w": ep.ParamState(jnp.ones(3)),
                         "h": ep.ShortTermState(jax.lax.axis_index("devices") * 1.0)},
                state_out_axes={None: OfType(ep.ParamState)},
            )
            one = ep.to_one_device(model, per_device="whole")
            back = ep.relayout(one, model)
            same = jax.tree.map(
                lambda a, b: bool((np.asarray(ep.to_one_device(a, per_device="whole"))
                                   == np.asarray(ep.to_one_device(b, per_device="whole"))).all())
                and a.sharding == b.sharding, back, model)
            print("relayout:", all(jax.tree.leaves(same)))
            f = ep.pmap2(lambda m, lr: m["w"].value * lr, in_axes=(ep.DEFAULT, None))
            try:
                f(model, np.float32(0.1 * (jax.process_index() + 1)))
            except ValueError as e:
                print("refused:", str(e)[:70])
            """
        )
    )
    proc = _launch(str(script), timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("relayout: True") == 2
    assert (
        proc.stdout.count(
            "refused: The input args[1] is to be replicated, but differs between the"
        )
        == 2
    )
