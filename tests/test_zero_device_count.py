"""`zero`'s sharded optimizer state moves to another number of devices: saved on 8,
loaded on 4 and on 3 (`load(..., per_device="regroup")`, both backends), it trains on
to the parameters an uninterrupted run on 8 reaches."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest


ROOT = pathlib.Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "tests" / "zero_device_count.py")


def _run(devices: int, *args) -> list[list[float]]:
    env = dict(os.environ, ZERO_DEVICES=str(devices))
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, SCRIPT, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [s for s in proc.stdout.splitlines() if s.startswith("RESULT ")]
    return [json.loads(s[len("RESULT ") :]) for s in lines]


@pytest.fixture(scope="module")
def on_eight(tmp_path_factory):
    d = tmp_path_factory.mktemp("zero8")
    (through,) = _run(8, "run", 4, 2, d)  # saved after step 2
    return d, through


@pytest.mark.parametrize("devices", [4, 3])
def test_a_zero_state_moves_to_another_device_count(on_eight, devices):
    d, through = on_eight
    results = _run(devices, "resume", d, 2, 4)
    assert len(results) == 2  # orbax, equinox
    for got in results:
        np.testing.assert_allclose(got, through, rtol=2e-5)
