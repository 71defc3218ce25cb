"""A smoke check on whatever accelerator the machine has (not a test: the test suite forces
8 CPU devices): with the library's defaults on the local devices (one GPU: a one-device
mesh), per-device states keep their device axis, a `pmap2` step gives the expected
update, donation frees its input, and a forgotten `pmean` is refused.

Run: `PYTHONPATH=. python benchmarks/gpu_smoke.py` (prints "SMOKE OK" at the end).
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import eqx_pmapstate as ep
from eqx_pmapstate.filters import OfType


print("backend", jax.default_backend(), jax.devices())


class Model(eqx.Module):
    weight: ep.ParamState | None = None
    hidden: ep.ShortTermState | None = None

    def init_state(self, size):
        return Model(
            ep.ParamState(jnp.arange(size, dtype=jnp.float32)),
            ep.ShortTermState(jnp.zeros(size)),
        )


m = ep.pmap2_new_states(
    Model(), {"size": 4}, state_out_axes={None: OfType(ep.ParamState)}
)
n = jax.local_device_count()
assert (
    m.hidden.value.shape == (n, 4) and m.hidden.value.sharding.spec[0] == "devices"
), m.hidden.value.sharding
assert m.weight.value.shape == (4,)
print(ep.describe(m))


@ep.pmap2
def step(model, x):
    g = jax.lax.pmean(jax.grad(lambda w: jnp.sum(w * x))(model.weight.value), "devices")
    model = eqx.tree_at(lambda t: t.weight.value, model, model.weight.value - 0.1 * g)
    return eqx.tree_at(lambda t: t.hidden.value, model, model.hidden.value + x)


x = jnp.ones((n, 4))
out = step(m, x)
np.testing.assert_allclose(np.asarray(out.weight.value), np.arange(4) - 0.1, rtol=1e-6)
assert out.hidden.value.sharding == m.hidden.value.sharding
d = ep.pmap2(lambda v: v * 2, donate="all")
v = out.hidden.value + 0
w = d(v)
print("donated on", jax.default_backend(), v.is_deleted())
try:
    ep.pmap2(
        lambda model, x: eqx.tree_at(
            lambda t: t.weight.value, model, model.weight.value + x.sum()
        )
    )(m, x)
    raise SystemExit("FORGOTTEN PMEAN NOT CAUGHT")
except ValueError as e:
    print("forgotten pmean refused:", str(e)[:80])
print("SMOKE OK")
