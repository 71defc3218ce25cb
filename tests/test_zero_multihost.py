"""`zero` over several processes: 2 processes of 4 CPU devices train to the parameters
that one process of 8 devices reaches, each device holding 1/8 of the state."""

import os
import pathlib
import re
import subprocess
import sys

import numpy as np


ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "tests" / "zero_multihost.py")
CHECKSUM = re.compile(r"checksum: (\S+) (\S+)")
STATE = re.compile(r"state bytes on one device: (\d+)")


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run(cmd):
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=240, env=_env(), cwd=ROOT
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    sums = [tuple(map(float, m)) for m in CHECKSUM.findall(proc.stdout)]
    return sums, [int(b) for b in STATE.findall(proc.stdout)]


def test_two_processes_of_four_train_as_one_of_eight():
    (alone,), (alone_bytes,) = _run([sys.executable, SCRIPT])
    launcher = [sys.executable, "-m", "eqx_pmapstate.launch", "--processes", "2"]
    launcher += ["--local-devices", "4", "--timeout", "220", SCRIPT]
    sums, state_bytes = _run(launcher)
    assert len(sums) == 2  # one line per process
    for got in sums:
        # The reduce-scatter may add in another order across processes: float32 close.
        np.testing.assert_allclose(got, alone, rtol=1e-6)
    # MLP(3, 1, 13, 2): 39 + 13 + 169 + 13 + 13 + 1 elements, in slices of 5, 2, 22, 2,
    # 2 and 1 per device; mu and nu of each, and the count.
    assert state_bytes == [alone_bytes] * 2
    assert alone_bytes == 2 * 4 * (5 + 2 + 22 + 2 + 2 + 1) + 4
