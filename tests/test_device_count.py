"""A checkpoint made on one number of devices, loaded on another (8 -> 4, 8 -> 1, 4 -> 8,
and 8 -> 4 -> 1), with both backends: a model (replicated parameters; a per-device float
statistic on device axis 1, a per-device counter and per-device keys on axis 0) and its
optax state after a training step. The device count is fixed per process, so each side
runs in its own."""

import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest


ROOT = pathlib.Path(__file__).resolve().parents[1]

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import equinox as eqx, jax, jax.numpy as jnp, numpy as np, optax
    import eqx_pmapstate as ep
    from eqx_pmapstate.filters import OfType, WithTag

    class Model(eqx.Module):
        linear: eqx.nn.Linear  # replicated
        stat: ep.ShortTermState  # float per device, device axis 1: (3, n)
        seen: ep.ShortTermState  # int per device, axis 0
        key: ep.ShortTermState  # typed keys per device, axis 0

    def build(key):
        i = jax.lax.axis_index("devices")
        f = (i + 1).astype(jnp.float32)
        return Model(
            eqx.nn.Linear(3, 2, key=key),
            ep.ShortTermState(jnp.arange(3.0) * f, tag="stat"),
            ep.ShortTermState(100 + i),
            ep.ShortTermState(jax.random.fold_in(key, i)),
        )

    AXES = {None: OfType(eqx.nn.Linear), 1: WithTag("stat")}  # else axis 0
    OPT = optax.adam(0.1)

    @ep.pmap2
    def step(model, opt, x):
        def loss(lin):
            return jnp.mean((jax.vmap(lin)(x) - model.stat.value[:2]) ** 2)
        grads = jax.lax.pmean(jax.grad(loss)(model.linear), "devices")
        updates, opt = OPT.update(grads, opt)
        new = Model(
            eqx.apply_updates(model.linear, updates),
            ep.ShortTermState(model.stat.value + 0.5, tag="stat"),
            ep.ShortTermState(model.seen.value + 1),
            ep.ShortTermState(jax.random.split(model.key.value)[0]),
        )
        return new, opt

    def fresh():
        model = ep.pmap2_new_states(build, {"key": jax.random.key(0)}, state_out_axes=AXES)
        init = ep.pmap2(lambda m: OPT.init(eqx.filter(m.linear, eqx.is_inexact_array)))
        return model, init(model)

    def values(tree):
        def raw(x):
            if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
                x = jax.random.key_data(x)
            return np.asarray(x).tolist()
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {jax.tree_util.keystr(p): raw(x) for p, x in flat}

    def layout(tree):
        return {
            jax.tree_util.keystr(p): [len(x.sharding.device_set), list(getattr(x.sharding, "spec", ["-"]))]
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]
        }

    mode, directory = sys.argv[1], sys.argv[2]
    n = jax.device_count()
    if mode == "save":
        model, opt = fresh()
        x = jnp.arange(n * 4 * 3, dtype=jnp.float32).reshape(n, 4, 3) / 10
        state = step(model, opt, x)
        for backend in ("orbax", "equinox"):
            ep.save(f"{directory}/{backend}{n}", state, backend=backend)
        print("RESULT", json.dumps({"values": values(state), "layout": layout(state)}))
    else:  # load <directory> <from n> <choice of seen> <choice of key>
        saved, seen_choice, key_choice = int(sys.argv[3]), sys.argv[4], sys.argv[5]
        made, opt_like = fresh()  # the optimizer state's layout, as a user makes it
        like = (ep.eval_new_states(build, {"key": jax.random.key(0)}, state_out_axes=AXES), opt_like)
        choices = {
            "leading": "leading",
            "first": "first",
            "tile": lambda a: jnp.tile(a, 2),
            "split": lambda keys: jax.random.split(keys[0], n),
        }
        # one choice per part: a pytree prefix of `like`
        per_device = (
            Model("first", "mean", choices[seen_choice], choices[key_choice]),
            "first",
        )
        out = {}
        for backend in ("orbax", "equinox"):
            got = ep.load(f"{directory}/{backend}{saved}", like, per_device=per_device)
            for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(like)):
                assert a.sharding == b.sharding and a.shape == b.shape and a.dtype == b.dtype
            got_step = step(*got, jnp.ones((n, 4, 3)))  # it trains on
            assert ep.describe(got_step) == ep.describe(step(*fresh(), jnp.ones((n, 4, 3))))
            if len(sys.argv) > 6:
                ep.save(f"{directory}/{backend}{n}", got, backend=backend)
            out[backend] = values(got)
        assert out["orbax"] == out["equinox"]
        print("RESULT", json.dumps({"values": out["orbax"], "layout": layout(got)}))
    """
)


# Orbax imports a name JAX 0.12 deprecates (the start of the message, as `-W` takes it)
IGNORE = "ignore:jax.sharding.SingleDeviceSharding is deprecated:DeprecationWarning"


def _run(tmp_path, devices: int, *args) -> dict:
    script = tmp_path / "count.py"
    script.write_text(SCRIPT)
    env = dict(os.environ)
    env["JAX_NUM_CPU_DEVICES"] = str(devices)  # the script runs on this many
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [
            sys.executable,
            "-W",
            "error",
            "-W",
            IGNORE,
            str(script),
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (line,) = [s for s in proc.stdout.splitlines() if s.startswith("RESULT ")]
    return json.loads(line[len("RESULT ") :])


REPLICATED = [
    "[0].linear.weight",
    "[0].linear.bias",
    "[1][0].count",
    "[1][0].mu.weight",
    "[1][0].mu.bias",
    "[1][0].nu.weight",
    "[1][0].nu.bias",
]


@pytest.fixture(scope="module")
def eight(tmp_path_factory):
    d = tmp_path_factory.mktemp("eight")
    return d, _run(d, 8, "save", str(d))


def _check(saved, got, m, seen, key):
    sv, gv = saved["values"], got["values"]
    for path in REPLICATED:  # restored exactly, laid out as in `like`
        assert gv[path] == sv[path], path
    assert got["layout"]["[0].linear.weight"] == [m, []]
    stat = np.asarray(sv["[0].stat.value"])  # (3, n): device axis 1
    assert np.allclose(
        gv["[0].stat.value"], np.repeat(stat.mean(1, keepdims=True), m, 1)
    )
    assert got["layout"]["[0].stat.value"] == [m, [None, "devices"]]
    assert gv["[0].seen.value"] == seen
    assert gv["[0].key.value"] == key
    assert got["layout"]["[0].seen.value"] == [m, ["devices"]]


def test_eight_to_four_to_one(eight, tmp_path):
    d, saved = eight
    four = _run(tmp_path, 4, "load", str(d), "8", "leading", "leading", "resave")
    seen, keys = saved["values"]["[0].seen.value"], saved["values"]["[0].key.value"]
    assert seen == list(range(101, 109))  # one step after 100 + i
    _check(saved, four, 4, seen[:4], keys[:4])
    # ... saved again from 4 devices, then loaded on 1
    one = _run(tmp_path, 1, "load", str(d), "4", "leading", "first")
    _check(four, one, 1, seen[:1], keys[:1])


def test_eight_to_one(eight, tmp_path):
    d, saved = eight
    one = _run(tmp_path, 1, "load", str(d), "8", "first", "first")
    seen, keys = saved["values"]["[0].seen.value"], saved["values"]["[0].key.value"]
    _check(saved, one, 1, seen[:1], keys[:1])


def test_four_to_eight(tmp_path):
    saved = _run(tmp_path, 4, "save", str(tmp_path))
    eight = _run(tmp_path, 8, "load", str(tmp_path), "4", "tile", "split")
    seen = saved["values"]["[0].seen.value"]
    assert eight["values"]["[0].seen.value"] == seen + seen
    _check(saved, eight, 8, seen + seen, eight["values"]["[0].key.value"])
    keys = np.asarray(eight["values"]["[0].key.value"])
    assert len({tuple(k) for k in keys}) == 8  # fresh keys, one per device


def test_two_processes_load_a_checkpoint_for_another_count(tmp_path):
    # 2 processes x 4 devices save; the same processes load it on 2 x 2 devices (Orbax:
    # each process reads the saved entries, then keeps the shards of its devices).
    script = tmp_path / "two.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys
            import jax
            import eqx_pmapstate as ep
            ep.initialize_distributed()
            import jax.numpy as jnp
            import numpy as np

            def build():
                i = jax.lax.axis_index("devices")
                return {"w": ep.NonBatchState(jnp.arange(3.0)),
                        "s": ep.State(jnp.stack([i, 10 * i]))}

            tree = ep.pmap2_new_states(build, state_out_axes={1: ...})
            ep.save(sys.argv[1], tree, backend="orbax")
            like = ep.eval_new_states(build, state_out_axes={1: ...}, axis_size=2)
            for name, choice in [("leading", "leading"), ("5", 5), ("even", lambda a: a[::2])]:
                got = ep.load(sys.argv[1], like, per_device=choice)
                assert got["s"].value.sharding == like["s"].value.sharding
                one = ep.to_one_device(got, per_device="whole")
                print("got", name, [np.asarray(x).ravel().tolist() for x in jax.tree.leaves(one)])
            """
        )
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "eqx_pmapstate.launch"]
    cmd += ["--processes", "2", "--local-devices", "4", "--timeout", "170"]
    cmd += [str(script), str(tmp_path / "ckpt")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    got = re.findall(r"\[process (\d)\] got (.*)", proc.stdout)
    w = [0.0, 1.0, 2.0]
    for process in ("0", "1"):
        assert [line for p, line in got if p == process] == [
            f"leading {[[0, 1, 2, 3, 0, 10, 20, 30], w]}",
            f"5 {[[5, 5, 5, 5, 50, 50, 50, 50], w]}",
            f"even {[[0, 2, 4, 6, 0, 20, 40, 60], w]}",
        ]
