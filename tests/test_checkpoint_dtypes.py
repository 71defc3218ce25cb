"""Every dtype JAX has round-trips through `save` and `load` on both backends, bit for bit,
with its layout: a property test over dtypes x layouts (replicated, device axis 0 or 1),
and the cases the issue names (bfloat16 with the Equinox backend, PRNG keys, float64)."""

import tempfile
from typing import Any as AnyType

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import N
from hypothesis import given, HealthCheck, settings, strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P

import eqx_pmapstate as ep


SETTINGS: dict[str, AnyType] = dict(
    deadline=None,
    derandomize=True,
    database=None,
    max_examples=12,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

# Every dtype of JAX's that both supported JAX versions can make on CPU (JAX 0.12's
# float8_e5m3fnu cannot be made on CPU: "Invalid element type").
DTYPES = [
    "bool",
    *("int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64"),
    *("float16", "bfloat16", "float32", "float64", "complex64", "complex128"),
    *("float8_e3m4", "float8_e4m3", "float8_e4m3b11fnuz", "float8_e4m3fn"),
    *("float8_e4m3fnuz", "float8_e5m2", "float8_e5m2fnuz", "float8_e8m0fnu"),
    *("float4_e2m1fn", "int2", "int4", "uint2", "uint4"),
    "key<threefry2x32>",  # typed keys, jax.random.key
    "raw key",  # jax.random.PRNGKey: uint32[..., 2]
]
LAYOUTS = [None, 0, 1]  # replicated, device axis 0, device axis 1


def _mesh():
    return ep.pmap2_new_states(lambda: jnp.zeros(())).sharding.mesh


def _bits(name: str, shape, rng) -> np.ndarray:
    """Random values of dtype `name` on the host: every bit pattern for the types of 8
    bits or more (NaNs, infinities, -0), every value for the sub-byte types."""
    if name == "bool":
        return rng.integers(0, 2, shape).astype(bool)
    dtype = np.dtype(getattr(jnp, name))
    if name in ("int2", "int4", "uint2", "uint4", "float4_e2m1fn"):
        info = jnp.iinfo(dtype) if "int" in name else None
        if info is not None:
            return rng.integers(int(info.min), int(info.max) + 1, shape).astype(dtype)
        return rng.uniform(-6, 6, shape).astype(dtype)
    raw = rng.integers(0, 256, (*shape, dtype.itemsize), dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


def _leaf(name: str, axis, rng):
    """A laid-out array of dtype `name` with its device axis at `axis`."""
    local = (3,) if axis is None else (2, 3)
    shape = local if axis is None else local[:axis] + (N,) + local[axis:]
    sharding = NamedSharding(
        _mesh(), P() if axis is None else P(*[None] * axis, "devices")
    )
    if name == "key<threefry2x32>":
        data = rng.integers(0, 2**32, (*shape, 2), dtype=np.uint32)
        keys = jax.random.wrap_key_data(data, impl="threefry2x32")
        return jax.device_put(keys, sharding)
    if name == "raw key":
        keys = jax.random.split(jax.random.PRNGKey(int(rng.integers(99))), shape)
        return jax.device_put(keys, sharding)
    return jax.device_put(_bits(name, shape, rng), sharding)


def _raw(x) -> np.ndarray:
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x)


def _assert_bitwise(restored, tree):
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(tree), strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert _raw(a).tobytes() == _raw(b).tobytes()
        assert a.sharding == b.sharding


@settings(**SETTINGS)
@given(
    leaves=st.lists(
        st.tuples(st.sampled_from(DTYPES), st.sampled_from(LAYOUTS)),
        min_size=1,
        max_size=6,
    ),
    seed=st.integers(0, 2**16),
)
def test_every_dtype_and_layout_round_trips_bit_for_bit(leaves, seed):
    rng = np.random.default_rng(seed)
    with jax.enable_x64(True):
        tree = {
            f"{name}@{axis}#{i}": _leaf(name, axis, rng)
            for i, (name, axis) in enumerate(leaves)
        }
        with tempfile.TemporaryDirectory() as d:
            for backend in ("orbax", "equinox"):
                ep.save(f"{d}/{backend}", tree, backend=backend)
                _assert_bitwise(ep.load(f"{d}/{backend}", tree, backend=backend), tree)
                like = ep.abstract(tree)
                _assert_bitwise(ep.load(f"{d}/{backend}", like, backend=backend), tree)


@pytest.mark.parametrize("backend", ["orbax", "equinox"])
def test_every_dtype_at_once(backend, tmp_path):
    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        tree = {f"{n}@{a}": _leaf(n, a, rng) for n in DTYPES for a in LAYOUTS}
        ep.save(tmp_path / "all", tree, backend=backend)
        _assert_bitwise(
            ep.load(tmp_path / "all", ep.abstract(tree), backend=backend), tree
        )


class Mixed(eqx.Module):
    weight: jax.Array  # bfloat16, replicated
    scale: ep.ShortTermState  # bfloat16, per device


def test_bfloat16_with_the_equinox_backend(tmp_path):
    # The default backend where Orbax is not installed; it failed with "|V2[4] on disk".
    model = ep.pmap2_new_states(
        lambda: Mixed(
            jnp.linspace(-1, 1, 4, dtype=jnp.bfloat16),
            ep.ShortTermState(jax.lax.axis_index("devices").astype(jnp.bfloat16) / 3),
        )
    )
    ep.save(tmp_path / "bf16.eqx", model, backend="equinox")
    restored = ep.load(tmp_path / "bf16.eqx", model)
    _assert_bitwise(restored, model)
    # The file is still Equinox's format: `tree_deserialise_leaves` reads it as the
    # bits, which `view` turns back into the values.
    plain = eqx.tree_deserialise_leaves(
        tmp_path / "bf16.eqx",
        jax.tree.map(lambda x: np.zeros(x.shape, np.uint16), model),
    )
    assert np.array_equal(plain.weight.view(jnp.bfloat16), np.asarray(model.weight))
