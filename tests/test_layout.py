"""Layout decisions (`_layout.step_layout`, `_layout.new_states_layout`) from made-up
facts about outputs: nothing is traced or run."""

import jax.tree_util as jtu
import pytest

from eqx_pmapstate._layout import DEFAULT, new_states_layout, OutLeaf, Pass, step_layout


def _p(*names):
    return tuple(jtu.GetAttrKey(n) for n in names)


def leaf(name="w", ndim=1, varying=False, input_index=None):
    return OutLeaf(_p(name), ndim, varying, input_index)


# --------------------------------------------------------------------------- step_layout


def test_default_invariant_is_replicated():
    layout = step_layout([leaf(varying=False)], [DEFAULT])
    assert layout.axes == (None,)
    assert layout.checked == frozenset()


def test_default_varying_gets_axis_0():
    layout = step_layout([leaf(varying=True)], [DEFAULT])
    assert layout.axes == (0,)
    assert layout.checked == frozenset()


def test_default_mixed_leaves():
    leaves = [leaf("a", varying=True), leaf("b"), leaf("c", varying=True)]
    assert step_layout(leaves, [DEFAULT] * 3).axes == (0, None, 0)


def test_replicated_varying_raises_naming_path_with_check_trace():
    leaves = [leaf("ok"), leaf("grads", varying=True)]
    with pytest.raises(ValueError, match=r"output\.grads") as e:
        step_layout(leaves, [None, None], check="trace")
    assert "output.ok" not in str(e.value)
    assert "pmean" in str(e.value)


def test_replicated_varying_error_names_the_axis():
    with pytest.raises(ValueError, match="'batch'"):
        step_layout([leaf(varying=True)], [None], axis_name="batch")


def test_replicated_varying_error_names_every_path():
    leaves = [leaf("a", varying=True), leaf("b", varying=True)]
    with pytest.raises(ValueError, match=r"output\.a, output\.b"):
        step_layout(leaves, [None, None])


def test_replicated_varying_error_names_nested_path():
    path = (jtu.DictKey("params"), jtu.SequenceKey(1))
    with pytest.raises(ValueError, match=r"output\['params'\]\[1\]"):
        step_layout([OutLeaf(path, 1, True)], [None])


def test_replicated_varying_is_checked_with_check_runtime():
    leaves = [leaf("a"), leaf("b", varying=True), leaf("c", varying=True)]
    layout = step_layout(leaves, [None, None, 0], check="runtime")
    assert layout.axes == (None, None, 0)
    assert layout.checked == frozenset({1})


def test_replicated_varying_passes_with_check_off():
    layout = step_layout([leaf(varying=True)], [None], check="off")
    assert layout.axes == (None,)
    assert layout.checked == frozenset()


def test_replicated_invariant_is_never_checked():
    for check in ("trace", "runtime", "off"):
        layout = step_layout([leaf(varying=False)], [None], check=check)
        assert layout.axes == (None,)
        assert layout.checked == frozenset()


def test_explicit_axis_on_invariant_leaf_is_kept():
    # Asking for a device axis is always allowed: an invariant value is copied.
    layout = step_layout([leaf(ndim=2, varying=False)], [1])
    assert layout.axes == (1,)


@pytest.mark.parametrize(
    "ndim, want, axis", [(2, -1, 2), (2, -3, 0), (0, -1, 0), (1, 1, 1), (3, -2, 2)]
)
def test_negative_axes_are_normalized(ndim, want, axis):
    # As jnp.expand_dims counts: -1 on a 2-d per-device leaf is the new last axis, 2.
    assert step_layout([leaf(ndim=ndim, varying=True)], [want]).axes == (axis,)


@pytest.mark.parametrize("want", [3, -4])
def test_out_of_range_axis_names_path(want):
    with pytest.raises(ValueError, match=r"\.bias"):
        step_layout([leaf("bias", ndim=2, varying=True)], [want])


def test_wanted_and_leaves_must_have_the_same_length():
    with pytest.raises(ValueError):
        step_layout([leaf(), leaf("v")], [DEFAULT])


def test_pass_when_output_is_passable_input_unchanged():
    # An invariant output that is replicated input 0 unchanged is handed back as is.
    out = leaf(input_index=0)
    assert step_layout(
        [out], [DEFAULT], in_axes=(None,), passable=frozenset({0})
    ).axes == (Pass(0),)
    # A varying one that is mapped input 1, wanted on the same axis.
    out = leaf(varying=True, input_index=1)
    layout = step_layout([out], [DEFAULT], in_axes=(None, 0), passable=frozenset({1}))
    assert layout.axes == (Pass(1),)


def test_no_pass_when_input_not_passable():
    out = leaf(varying=True, input_index=0)
    layout = step_layout([out], [DEFAULT], in_axes=(0,), passable=frozenset())
    assert layout.axes == (0,)


def test_no_pass_when_output_is_not_an_input():
    out = leaf(varying=True, input_index=None)
    layout = step_layout([out], [DEFAULT], in_axes=(0,), passable=frozenset({0}))
    assert layout.axes == (0,)


def test_no_pass_when_axes_disagree():
    # Input 0 is mapped on axis 0; the output is wanted on axis 1.
    out = leaf(ndim=1, varying=True, input_index=0)
    layout = step_layout([out], [1], in_axes=(0,), passable=frozenset({0}))
    assert layout.axes == (1,)
    # Input 0 is replicated; the output is wanted with a device axis.
    out = leaf(input_index=0)
    layout = step_layout([out], [0], in_axes=(None,), passable=frozenset({0}))
    assert layout.axes == (0,)


def test_pass_after_normalizing_axis():
    # -2 on a 1-d leaf is axis 0, the axis input 0 is mapped on.
    out = leaf(ndim=1, varying=True, input_index=0)
    layout = step_layout([out], [-2], in_axes=(0,), passable=frozenset({0}))
    assert layout.axes == (Pass(0),)


def test_no_pass_for_checked_output():
    # A checked output is compared at run time, so it must come out of the program.
    out = leaf(varying=True, input_index=0)
    layout = step_layout(
        [out], [None], check="runtime", in_axes=(None,), passable=frozenset({0})
    )
    assert layout.axes == (None,)
    assert layout.checked == frozenset({0})


# --------------------------------------------------------------------------- new_states_layout


def test_new_states_held_leaves_come_back_as_pass():
    leaves = [leaf("old", input_index=3), leaf("new", varying=True)]
    layout = new_states_layout(leaves, [None, 0], held={_p("old"): 3})
    assert layout.axes == (Pass(3), 0)
    assert layout.checked == frozenset()


def test_new_states_held_leaf_ignores_its_wanted_axis():
    # A held leaf keeps its layout, whatever the filters say (even an invalid axis).
    layout = new_states_layout([leaf("old", input_index=0)], [7], held={_p("old"): 0})
    assert layout.axes == (Pass(0),)


def test_new_states_held_leaf_changed_raises_naming_path():
    leaves = [leaf("old", input_index=None)]
    with pytest.raises(ValueError, match=r"\.old"):
        new_states_layout(leaves, [None], held={_p("old"): 0})


def test_new_states_held_leaf_replaced_by_another_input_raises():
    leaves = [leaf("old", input_index=1)]
    with pytest.raises(ValueError, match=r"\.old"):
        new_states_layout(leaves, [None], held={_p("old"): 0})


def test_new_states_held_leaf_dropped_raises_naming_path():
    leaves = [leaf("new", varying=True)]
    with pytest.raises(ValueError, match=r"\.gone"):
        new_states_layout(leaves, [0], held={_p("gone"): 0})


def test_new_states_replicated_varying_leaf_is_checked():
    leaves = [leaf("a"), leaf("b", varying=True), leaf("c", varying=True)]
    layout = new_states_layout(leaves, [None, None, 0], held={})
    assert layout.axes == (None, None, 0)
    assert layout.checked == frozenset({1})


def test_new_states_axes_are_normalized():
    leaves = [leaf("a", ndim=2, varying=True), leaf("b", ndim=0)]
    assert new_states_layout(leaves, [-1, -1], held={}).axes == (2, 0)


def test_new_states_out_of_range_axis_names_path():
    with pytest.raises(ValueError, match=r"\.big"):
        new_states_layout([leaf("big", ndim=1)], [2], held={})
