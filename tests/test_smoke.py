import equinox as eqx
import jax
import jax.numpy as jnp

import eqx_pmapstate as ep


class Counter(eqx.Module):
    count: ep.ShortTermState | None = None

    def init_state(self):
        return Counter(ep.ShortTermState(jnp.array(0)))


def test_counter(leaks):
    m = ep.pmap2_new_states(Counter())
    assert m.count.value.shape == (8,)
    assert m.count.value.sharding.spec == jax.sharding.PartitionSpec("devices")
