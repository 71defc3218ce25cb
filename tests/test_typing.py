"""`PerDevice`: the device axis in jaxtyping annotations, checked with beartype."""

import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from beartype import beartype
from helpers import N
from jaxtyping import Array, Float, Int, jaxtyped, TypeCheckError

import eqx_pmapstate as ep
from eqx_pmapstate import PerDevice


Row = PerDevice[Float[Array, "3"]]


def test_outside_a_mapped_function_the_device_axis_is_there():
    assert isinstance(jnp.ones((N, 3)), Row)
    assert not isinstance(jnp.ones(3), Row)  # the per-device view
    assert not isinstance(jnp.ones((N, 4)), Row)  # another shape
    assert not isinstance(
        jnp.ones((N, 3), jnp.int32), Row
    )  # the dtype constraint is kept
    assert isinstance(jnp.ones((N, 3), jnp.int32), PerDevice[Int[Array, "3"]])


def test_another_name_or_position_of_the_device_axis():
    last = PerDevice[Float[Array, "3 4"], "devices", -1]  # pyright: ignore[reportInvalidTypeForm, reportUndefinedVariable]  # runtime-only form: statically PerDevice takes one argument
    middle = PerDevice[Float[Array, "3 4"], "devices", 1]  # pyright: ignore[reportInvalidTypeForm, reportUndefinedVariable]  # runtime-only form: statically PerDevice takes one argument
    members = PerDevice[Float[Array, "3"], "members"]  # pyright: ignore[reportInvalidTypeForm]  # runtime-only form: statically PerDevice takes one argument
    assert isinstance(jnp.ones((3, 4, N)), last)
    assert not isinstance(jnp.ones((N, 3, 4)), last)
    assert isinstance(jnp.ones((3, N, 4)), middle)
    assert isinstance(jnp.ones((5, 3)), members)
    assert "'members'" in repr(members)


def test_bad_uses_are_clear_errors():
    with pytest.raises(TypeError, match="jaxtyping array annotation"):
        PerDevice[int]
    with pytest.raises(TypeError, match="out of range"):
        PerDevice[Float[Array, "3"], "devices", 3]  # pyright: ignore[reportInvalidTypeForm, reportUndefinedVariable]  # runtime-only form: statically PerDevice takes one argument
    with pytest.raises(TypeError, match="variadic"):
        PerDevice[Float[Array, "*batch 3"], "devices", 1]  # pyright: ignore[reportInvalidTypeForm, reportUndefinedVariable]  # runtime-only form: statically PerDevice takes one argument
    assert isinstance(jnp.ones((N, 2, 3)), PerDevice[Float[Array, "*batch 3"]])


def test_arguments_made_for_different_device_counts_do_not_check_together():
    @jaxtyped(typechecker=beartype)
    def total(a: Row, b: Row) -> Float[Array, ""]:
        return a.sum() + b.sum()

    assert float(total(jnp.ones((N, 3)), jnp.ones((N, 3)))) == 2.0 * N * 3
    with pytest.raises(TypeCheckError, match=r"(?s)parameter 'b'.*devices=8"):
        total(jnp.ones((N, 3)), jnp.ones((4, 3)))


@jaxtyped(typechecker=beartype)
class Hidden(eqx.Module):
    state: PerDevice[Float[Array, "4"]]


def _make_hidden():
    return Hidden(jnp.zeros(4) + jax.lax.axis_index("devices").astype(jnp.float32))


def test_a_field_without_the_device_axis_is_rejected():
    with pytest.raises(TypeCheckError, match="parameter 'state'"):
        Hidden(jnp.zeros(4))
    Hidden(jnp.zeros((N, 4)))  # the global view: fine


def test_one_annotation_fits_both_views_of_a_module(leaks):
    # Made per device inside the initialisation (the field is `(4,)` there), returned
    # with the device axis: the same class checks both.
    made = ep.pmap2_new_states(_make_hidden)
    assert made.state.shape == (N, 4)
    assert isinstance(made.state, PerDevice[Float[Array, "4"]])

    @ep.pmap2
    def step(h: Hidden) -> Hidden:
        return Hidden(h.state + 1.0)  # checked per device

    out = step(made)
    np.testing.assert_array_equal(np.asarray(out.state)[:, 0], np.arange(N) + 1.0)


def _double(x: PerDevice[Float[Array, "3"]]) -> PerDevice[Float[Array, "3"]]:
    return x * 2


def test_jaxtyped_on_a_pmap2_function_and_on_the_function_inside(leaks):
    outer = jaxtyped(typechecker=beartype)(ep.pmap2(_double))
    inner = ep.pmap2(jaxtyped(typechecker=beartype)(_double))
    x = jnp.ones((N, 3))
    np.testing.assert_array_equal(np.asarray(outer(x)), 2 * np.ones((N, 3)))
    np.testing.assert_array_equal(np.asarray(inner(x)), 2 * np.ones((N, 3)))
    with pytest.raises(TypeCheckError, match="parameter 'x'"):
        outer(jnp.ones((N, 4)))
    with pytest.raises(TypeCheckError, match="parameter 'x'"):
        inner(jnp.ones((N, 4)))  # per device: (4,) is not (3,)


def test_the_import_hook_checks_the_library():
    # `make test` runs the whole suite once under this hook (job 2); here, a short proof
    # that it reaches the library's functions.
    script = textwrap.dedent(
        """
        import jax
        jax.config.update("jax_num_cpu_devices", 8)
        from jaxtyping import install_import_hook
        with install_import_hook("eqx_pmapstate", "beartype.beartype"):
            import eqx_pmapstate as ep
        try:
            ep.pmap2_new_states(lambda: ep.State(1.0), axis_size="4")
        except Exception as e:
            print(type(e).__name__)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120
    )
    assert proc.stdout.strip() == "TypeCheckError", proc.stderr
