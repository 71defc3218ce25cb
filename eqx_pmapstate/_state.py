"""State markers: small immutable wrappers that name what kind of state a value is."""

from typing import Generic, TypeVar

import equinox as eqx
import jax.numpy as jnp


Value = TypeVar("Value")


def _number_as_array(value):
    """A Python number becomes an array (weakly typed, as `jnp.asarray` makes it): a
    state is made of arrays, and code written for brainstate says
    `ShortTermState(0.0)`."""
    if isinstance(value, (bool, int, float, complex)):
        return jnp.asarray(value)
    return value


class State(eqx.Module, Generic[Value]):
    """A state of a module: a pytree of arrays that is laid out over a mapped axis as one unit.

    Markers exist so that code written in brainstate's vocabulary reads the same here
    (`model.weight.value.shape`). They are ordinary immutable Equinox modules: replace a
    state with `eqx.tree_at(lambda m: m.weight.value, model, new_value)`.

    An array leaf that is not inside any marker (for example the weight of an
    `eqx.nn.Linear`) is a state of its own; a marker groups its whole `value`, so every
    array in it gets the same axis.

    **Arguments:**

    - `value`: any pytree of arrays (a Python number is made an array).
    - `tag`: an optional string, matched by [`eqx_pmapstate.filters.WithTag`][].

    Markers are generic in the type of their value, for annotations:
    `weight: ParamState[PerDevice[Float[Array, "features"]]]` (for readers and static
    checkers: beartype checks that the field is a `ParamState`, not its value).
    """

    value: Value = eqx.field(converter=_number_as_array)
    tag: str | None = eqx.field(static=True, default=None)


class ParamState(State[Value]):
    """A trainable parameter."""


class ShortTermState(State[Value]):
    """A state that changes from step to step: hidden states, counters."""


class LongTermState(State[Value]):
    """A state kept over many steps: running statistics, moving averages."""


class NonBatchState(State[Value]):
    """A state that is the same on every device or ensemble member.

    It is always replicated (axis `None`), whatever `state_out_axes` says; the library
    checks that its value really agrees everywhere and raises an error naming it
    otherwise.
    """
