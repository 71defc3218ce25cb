"""`to_one_device`: a laid-out tree taken out of the layout, to evaluate, export or
serialise on one device; per-device leaves become what the user chooses."""

import os
import pathlib
import re
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_laid_out, N

import eqx_pmapstate as ep
from eqx_pmapstate.filters import OfType, WithTag


ROOT = pathlib.Path(__file__).resolve().parents[1]


class Net(eqx.Module):
    linear: eqx.nn.Linear  # replicated parameters
    mean: ep.ShortTermState  # a running mean per device, device axis 1: (3, n)
    var: ep.ShortTermState  # per device, device axis -1: (2, 3, n)
    seen: ep.ShortTermState  # a counter per device, axis 0
    key: ep.ShortTermState  # typed PRNG keys per device, axis 0

    def __call__(self, x):
        return (self.linear(x) - self.mean.value[:2]) / jnp.sqrt(self.var.value[0, :2])


def _make(key):
    i = jax.lax.axis_index("devices")
    f = i.astype(jnp.float32)
    return Net(
        eqx.nn.Linear(3, 2, key=key),
        ep.ShortTermState(jnp.arange(3.0) + f, tag="stat"),
        ep.ShortTermState(jnp.ones((2, 3)) + f, tag="var"),
        ep.ShortTermState(10 * i),
        ep.ShortTermState(jax.random.fold_in(key, i)),
    )


AXES = {1: WithTag("stat"), -1: WithTag("var"), None: OfType(eqx.nn.Linear)}  # else 0


@pytest.fixture(scope="module")
def net():
    return ep.pmap2_new_states(_make, {"key": jax.random.key(0)}, state_out_axes=AXES)


def _on(x, device):
    # one device, and no mesh: an ordinary array (as `jnp.zeros(3)` on that device)
    plain = jax.device_put(jnp.zeros(()), device).sharding
    return x.devices() == {device} and x.sharding == plain


def _keys(x):
    return np.asarray(jax.random.key_data(x))


def test_per_device_leaves_are_refused_by_default_naming_them(net):
    with pytest.raises(ValueError) as e:
        ep.to_one_device(net)
    message = str(e.value)
    assert message.startswith(
        "The leaves at .mean.value, .var.value, .seen.value, .key.value are per device"
    )
    for choice in ("'first'", "'mean'", "an index", "'whole'", "a callable"):
        assert choice in message
    # nothing is refused when nothing is per device
    params = ep.to_one_device(net.linear)
    assert np.array_equal(params.weight, net.linear.weight)


def test_first_takes_the_first_devices_entry_on_the_first_device(net):
    one = ep.to_one_device(net, per_device="first")
    device = jax.local_devices()[0]
    for x in jax.tree.leaves(one):
        assert _on(x, device)
    assert np.array_equal(one.linear.weight, net.linear.weight)
    assert np.array_equal(one.mean.value, np.arange(3.0))  # axis 1 taken out
    assert np.array_equal(one.var.value, np.ones((2, 3)))  # axis -1 taken out
    assert int(one.seen.value) == 0
    assert np.array_equal(_keys(one.key.value), _keys(net.key.value)[0])
    assert_laid_out(net.seen.value, 0)  # the input is untouched


def test_an_index_a_mean_and_a_callable(net):
    last = ep.to_one_device(net, per_device=-1)
    assert int(last.seen.value) == 10 * (N - 1)
    assert np.array_equal(last.mean.value, np.arange(3.0) + N - 1)
    third = ep.to_one_device(net, per_device=3)
    assert np.array_equal(third.var.value, np.full((2, 3), 4.0))
    biggest = ep.to_one_device(net, per_device=lambda a: a[-1])  # device axis first
    assert np.array_equal(biggest.mean.value, last.mean.value)
    # one choice per part: a pytree prefix of the tree, as `in_axes`
    choice = Net("first", "mean", "mean", lambda counts: counts.sum(), "first")  # pyright: ignore[reportArgumentType]
    mixed = ep.to_one_device(net, per_device=choice)
    assert np.allclose(mixed.mean.value, np.arange(3.0) + (N - 1) / 2)
    assert np.allclose(mixed.var.value, np.full((2, 3), 1 + (N - 1) / 2))
    assert int(mixed.seen.value) == 10 * sum(range(N))


def test_mistakes_are_clear_errors(net):
    with pytest.raises(
        ValueError,
        match=r"averages floating-point leaves only, but the leaf at \.seen\.value is int32",
    ):
        ep.to_one_device(net, per_device="mean")
    with pytest.raises(
        ValueError,
        match=r"`per_device=8` is out of range for the leaf at \.mean\.value, which has 8 entries",
    ):
        ep.to_one_device(net, per_device=N)
    with pytest.raises(
        TypeError, match=r"`per_device` of `to_one_device` takes .* but got 'avg'"
    ):
        ep.to_one_device(net, per_device="avg")
    with pytest.raises(TypeError, match=r"`device` must be a `jax.Device`"):
        ep.to_one_device(net, per_device="first", device=0)  # pyright: ignore[reportArgumentType]
    with pytest.raises(
        ValueError,
        match=r"`per_device` of `to_one_device` must be one choice or a pytree prefix",
    ):
        ep.to_one_device(net, per_device=["first", "mean"])


def test_a_given_device_and_a_forward_pass_that_matches_the_layout(net):
    device = jax.devices()[5]
    one = ep.to_one_device(net, per_device=5, device=device)
    assert all(_on(x, device) for x in jax.tree.leaves(one))
    x = jnp.arange(N * 4 * 3, dtype=jnp.float32).reshape(N, 4, 3) / 50
    everywhere = ep.pmap2(lambda m, x: jax.vmap(m)(x))(net, x)
    here = eqx.filter_jit(lambda m, x: jax.vmap(m)(x))(
        one, jax.device_put(x[5], device)
    )
    assert _on(here, device)
    assert np.allclose(here, everywhere[5], rtol=1e-6)


def test_serialise_and_relayout_back(net, tmp_path):
    whole = ep.to_one_device(net, per_device="whole")
    assert whole.mean.value.shape == (3, N) and _on(whole.mean.value, jax.devices()[0])
    # (Equinox's serialisation cannot write typed keys: store their raw data)
    raw = eqx.tree_at(lambda m: m.key.value, whole, replace_fn=jax.random.key_data)
    eqx.tree_serialise_leaves(tmp_path / "net.eqx", raw)
    read = eqx.tree_deserialise_leaves(tmp_path / "net.eqx", raw)
    assert _on(read.linear.weight, jax.devices()[0])
    read = eqx.tree_at(lambda m: m.key.value, read, replace_fn=jax.random.wrap_key_data)
    back = ep.relayout(read, net)
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(net), strict=True):
        if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
            a, b = jax.random.key_data(a), jax.random.key_data(b)
        assert np.array_equal(a, b) and a.sharding == b.sharding
    assert ep.describe(back) == ep.describe(net)


def test_every_process_gets_the_same_tree(tmp_path):
    script = tmp_path / "one.py"
    script.write_text(
        textwrap.dedent(
            """
            import jax
            import eqx_pmapstate as ep
            ep.initialize_distributed()
            import jax.numpy as jnp
            import numpy as np

            i = lambda: jax.lax.axis_index("devices").astype(jnp.float32)
            tree = ep.pmap2_new_states(
                lambda: {"w": ep.NonBatchState(jnp.arange(3.0)),
                         "s": ep.State(jnp.stack([i(), 2 * i()]))},
                state_out_axes={1: ...},
            )
            for choice in ("first", 6, "mean", "whole"):
                one = ep.to_one_device(tree, per_device=choice)
                assert one["s"].value.devices() == {jax.local_devices()[0]}
                values = [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(one)]
                print("got", choice, values)
            """
        )
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "eqx_pmapstate.launch", "--processes", "2"]
    cmd += ["--local-devices", "4", "--timeout", "110", str(script)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = re.findall(r"\[process (\d)\] got (.*)", proc.stdout)
    by_process = {p: [line for q, line in got if q == p] for p in ("0", "1")}
    w = [0.0, 1.0, 2.0]
    assert (
        by_process["0"]
        == by_process["1"]
        == [
            f"first {[[0.0, 0.0], w]}",
            f"6 {[[6.0, 12.0], w]}",
            f"mean {[[3.5, 7.0], w]}",
            f"whole {[[float(k) for k in range(8)] + [2.0 * k for k in range(8)], w]}",
        ]
    )
