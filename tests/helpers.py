"""Layout assertions and small models shared by the test files."""

import equinox as eqx
import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding

import eqx_pmapstate as ep


N = 8  # the tests force 8 CPU devices


def _spec(x):
    """The PartitionSpec of a global array as a tuple, trailing Nones dropped."""
    spec = list(x.sharding.spec)
    while spec and spec[-1] is None:
        spec.pop()
    return tuple(spec)


def assert_laid_out(x, axis, n=N, name="devices", devices=None):
    """`x` is a global jax.Array on a 1-D mesh `name` of `n` devices, with `name` at
    position `axis` of its spec (None: replicated)."""
    assert isinstance(x, jax.Array)
    s = x.sharding
    assert isinstance(s, NamedSharding)
    mesh = s.mesh
    assert isinstance(mesh, Mesh)  # a concrete mesh, not an AbstractMesh
    assert mesh.axis_names == (name,)
    assert mesh.devices.shape == (n,)
    if devices is not None:
        assert list(mesh.devices.ravel()) == list(devices)
    if axis is None:
        assert _spec(x) == ()
        assert s.is_fully_replicated
    else:
        assert _spec(x) == (None,) * axis + (name,)
        assert x.shape[axis] == n
        assert len(x.addressable_shards) == n


def _idx(name="devices"):
    return jax.lax.axis_index(name).astype(jnp.float32)


def _none(x):
    return x is None


class Counter(eqx.Module):
    """The smallest `init_state` module: one per-device counter, made at 0."""

    count: ep.ShortTermState | None = None

    def init_state(self):
        return Counter(ep.ShortTermState(jnp.array(0)))


class ParallelModel(eqx.Module):
    """The reference page's second example, with a `__call__` for `Map`."""

    weight: ep.ParamState | None = None
    bias: ep.ParamState | None = None

    def init_state(self, layer_size):
        weight = ep.ParamState(jax.random.normal(jax.random.PRNGKey(0), (layer_size,)))
        bias = ep.ParamState(jnp.zeros(layer_size))
        return eqx.tree_at(
            lambda m: (m.weight, m.bias), self, (weight, bias), is_leaf=_none
        )

    def __call__(self, x):
        assert self.weight is not None and self.bias is not None  # set by init_state
        return (
            x * self.weight.value[None] + self.bias.value[None]
        )  # x: (batch, features)


class BNNet(eqx.Module):
    """A Linear and a BatchNorm, for `eqx.nn.make_with_state`."""

    linear: eqx.nn.Linear
    bn: eqx.nn.BatchNorm

    def __init__(self, key):
        self.linear = eqx.nn.Linear(3, 2, key=key)
        self.bn = eqx.nn.BatchNorm(2, axis_name="batch", mode="ema")


def ours(error: BaseException) -> bool:
    """Whether `error` is this library's own, not a type check's. Under jaxtyping's
    import hook (one of the test runs), beartype checks the annotated types of the public
    functions first and raises a `TypeCheckError` (a `TypeError` naming the parameter and
    the value); only the library's own messages can be matched word for word."""
    return type(error).__name__ != "TypeCheckError"
