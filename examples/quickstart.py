"""Quick start: the first three examples of brainstate's `pmap2_new_states` page, written
the Equinox way (immutable modules; `init_state` returns the new module), on 8 devices.

Run: `make demo` (or `.venv/bin/python examples/quickstart.py`). On a machine with one
CPU it makes 8 CPU devices itself.
"""

import os

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

import eqx_pmapstate as ep
from eqx_pmapstate import PerDevice
from eqx_pmapstate.filters import OfType


# 8 CPU devices where there is no accelerator, before JAX's first computation (a count
# given by the caller, JAX_NUM_CPU_DEVICES=4 for example, is kept).
if "JAX_NUM_CPU_DEVICES" not in os.environ:
    jax.config.update("jax_num_cpu_devices", 8)


n = jax.local_device_count()


# 1. Basic parallel initialisation: one counter per device.
# `PerDevice[...]` says what `pmap2_new_states` returns: the array with a device axis
# (inside a mapped function, the same annotation is the one device's view).
class ParallelCounter(eqx.Module):
    count: ep.ShortTermState[PerDevice[Int[Array, ""]]] | None = None

    def init_state(self):
        return ParallelCounter(ep.ShortTermState(jnp.array(0)))


module = ep.pmap2_new_states(ParallelCounter(), init_kwargs={}, axis_size=n)
assert module.count.value.shape == (n,)
print(f"1. ParallelCounter: count.value.shape = {module.count.value.shape}")
print(ep.describe(module), end="\n\n")


# 2. Parameters laid out along the device axis.
class ParallelModel(eqx.Module):
    weight: ep.ParamState[PerDevice[Float[Array, " features"]]] | None = None
    bias: ep.ParamState[PerDevice[Float[Array, " features"]]] | None = None

    def init_state(self, layer_size):
        return ParallelModel(
            weight=ep.ParamState(jax.random.normal(jax.random.key(0), (layer_size,))),
            bias=ep.ParamState(jnp.zeros(layer_size)),
        )


model = ep.pmap2_new_states(
    ParallelModel(),
    init_kwargs={"layer_size": 128},
    axis_size=n,
    state_out_axes={0: OfType(ep.ParamState)},
)
assert model.weight.value.shape == (n, 128) and model.bias.value.shape == (n, 128)
print(
    f"2. ParallelModel: weight {model.weight.value.shape}, bias {model.bias.value.shape}"
)
print(ep.describe(model), end="\n\n")


# 3. Mixed: a per-device state beside a replicated one.
class MixedParallelModule(eqx.Module):
    local_state: ep.ShortTermState[PerDevice[Int[Array, ""]]] | None = None
    global_config: ep.NonBatchState[Float[Array, "3"]] | None = None  # replicated

    def init_state(self):
        return MixedParallelModule(
            local_state=ep.ShortTermState(jnp.array(0)),  # one per device
            global_config=ep.NonBatchState(
                jnp.array([1.0, 2.0, 3.0])
            ),  # the same everywhere
        )


mixed = ep.pmap2_new_states(MixedParallelModule(), init_kwargs={}, axis_size=n)
assert mixed.local_state.value.shape == (n,) and mixed.global_config.value.shape == (3,)
print(
    f"3. MixedParallelModule: local_state {mixed.local_state.value.shape}, "
    f"global_config {mixed.global_config.value.shape}"
)
print(ep.describe(mixed), end="\n\n")
print(
    "states_by_axis:",
    {
        axis: [jax.tree_util.keystr(p) for p, _ in states]
        for axis, states in ep.states_by_axis(mixed).items()
    },
)


# And a step over the distributed module: every leaf keeps its layout.
@ep.pmap2
def step(module, x):
    count = module.local_state.value + x.shape[0]
    return eqx.tree_at(lambda m: m.local_state.value, module, count)


for _ in range(3):
    mixed = step(mixed, jnp.ones((n, 4)))
print(
    f"\nAfter 3 steps: local_state = {mixed.local_state.value.tolist()}, "
    f"global_config still {mixed.global_config.value.shape} and replicated"
)
