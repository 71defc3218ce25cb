"""The default rule for outputs (`out_axes=DEFAULT`): an output of an argument's
structure takes its layout; other leaves are replicated when proved the same on every
device, else get a device axis at 0 (the second part is `_layout.step_layout`'s). Also
`want_of`, the callback that gives the trace what each output asks for."""

from __future__ import annotations

import functools

import jax
import jax.tree_util as jtu
import numpy as np

from .._layout import DEFAULT, Inherited, output_name
from .._trace import is_output_array
from .._tree import is_arraylike
from ._axes import prefix_axes, StateAxes
from ._inputs import CallInputs, on_mesh


def rule1_candidates(args, inputs: CallInputs, axis_name, fun=None) -> list:
    """The positional arguments whose layout an output of the same structure takes: all
    but bare arrays, which count only when left to the default rule and laid out on the
    mesh; a bare array only passes its layout to an array of its per-device shape and
    dtype. Then a callable pytree `fun`, and the
    instance of a bound method (tried at position 0, as `self` is in the class body).
    Each candidate: `(structure, position, bare, layouts, per-device shapes, name)`."""
    out = []
    if fun is not None:
        n = len(jtu.tree_leaves(fun))
        layouts = inputs.layout_of_leaf[len(inputs.layout_of_leaf) - n :]
        shapes = _local_shapes(fun, layouts)
        instance = getattr(fun, "__self__", None)
        if instance is not None and len(jtu.tree_leaves(instance)) == n:
            out.append((jtu.tree_structure(instance), 0, None, layouts, shapes, "self"))
        out.append(
            (jtu.tree_structure(fun), 0, None, layouts, shapes, "the function itself")
        )
    return out + _arg_candidates(args, inputs, axis_name)


def _local_shapes(tree, layouts) -> tuple:
    """The per-device shape of each array leaf of `tree` (None for other leaves)."""
    out = []
    for leaf, axis in zip(jtu.tree_leaves(tree), layouts):
        if not is_arraylike(leaf) or axis is DEFAULT:
            out.append(None)
            continue
        shape = list(np.shape(leaf))
        if axis is not None:
            del shape[axis]
        out.append(tuple(shape))
    return tuple(out)


def _arg_candidates(args, inputs: CallInputs, axis_name) -> list:
    starts = np.cumsum([0] + [len(jtu.tree_leaves(a)) for a in args]).tolist()
    out = []
    for a_idx, arg in enumerate(args):
        bare = None
        if is_arraylike(arg):
            # Only a layout read off the mesh passes on: one given by `in_axes` does
            # not, whether or not the array is on the mesh, as inside `jax.jit`
            # (where that is unknown), so that `jax.jit` does not change the output.
            explicit = starts[a_idx] in inputs.explicit
            if explicit or not on_mesh(arg, axis_name):
                continue
            axis = inputs.layout_of_leaf[starts[a_idx]]
            local = list(np.shape(arg))
            if axis is not None:
                del local[axis]
            bare = (tuple(local), jax.numpy.result_type(arg))
        layouts = inputs.layout_of_leaf[starts[a_idx] : starts[a_idx + 1]]
        shapes = _local_shapes(arg, layouts)
        name = f"args[{a_idx}]"
        out.append((jtu.tree_structure(arg), a_idx, bare, layouts, shapes, name))
    return out


def _inherited(candidates, sub, prefer=None) -> list | None:
    # The argument at the same position is tried first, then the others in order, so
    # that `return model, state` after `step(model, state, ...)` pairs them up even when
    # the two have the same structure.
    # An output of the argument's structure but other per-device shapes (a norm per
    # leaf) does not take its layout: the next rule decides.
    structure = jtu.tree_structure(sub)
    for struct, a_idx, bare, layouts, shapes, name in sorted(
        candidates, key=lambda c: c[1] != prefer
    ):
        if bare is not None and (
            not is_arraylike(sub) or (np.shape(sub), jax.numpy.result_type(sub)) != bare
        ):
            continue
        if struct == structure and _same_shapes(sub, shapes):
            return [Inherited(axis, name) for axis in layouts]
    return None


def _same_shapes(sub, shapes) -> bool:
    for leaf, shape in zip(jtu.tree_leaves(sub), shapes):
        if shape is not None and is_output_array(leaf) and np.shape(leaf) != shape:
            return False
    return True


def _wanted_by_default(candidates, out) -> list:
    wanted = _inherited(candidates, out)
    if wanted is not None:
        return wanted
    if isinstance(out, tuple):
        wanted = []
        for position, element in enumerate(out):
            got = _inherited(candidates, element, prefer=position)
            wanted += (
                got if got is not None else [DEFAULT] * len(jtu.tree_leaves(element))
            )
        return wanted
    return [DEFAULT] * len(jtu.tree_leaves(out))


def _is_number(x) -> bool:
    return isinstance(x, (bool, int, float, complex))


def numbers_as_arrays(out_axes, out):
    """`out`, with each Python number that `out_axes` gives an axis (an int, or a
    callable returning one) made an array, so that it comes back with a device axis as
    it does from `jax.pmap` and `eqx.filter_pmap`. With the default rule or a
    `StateAxes`, numbers stay static."""
    if out_axes is DEFAULT or isinstance(out_axes, StateAxes):
        return out
    leaves, treedef = jtu.tree_flatten(out)
    if not any(map(_is_number, leaves)):
        return out
    wanted = prefix_axes(out_axes, out, "out_axes")
    for i, (leaf, w) in enumerate(zip(leaves, wanted, strict=True)):
        if _is_number(leaf) and callable(w) and w is not DEFAULT:
            w = w(leaf)
        if _is_number(leaf) and isinstance(w, (int, np.integer)):
            leaves[i] = jax.numpy.asarray(leaf)
    return treedef.unflatten(leaves)


def want_of(out_axes, candidates):
    """The `want` callback of the trace: per array output, the axis asked for."""

    def want(out, flat):
        if isinstance(out_axes, StateAxes):
            by_path = out_axes.axes_of(
                out, show=functools.partial(output_name, structure=out)
            )
            wanted = [by_path.get(p, DEFAULT) for p, _ in flat]
        elif out_axes is not DEFAULT:
            wanted = prefix_axes(out_axes, out, "out_axes")
        else:
            wanted = _wanted_by_default(candidates, out)
        result = []
        for (_, leaf), w in zip(flat, wanted, strict=True):
            if is_output_array(leaf):
                result.append(w(leaf) if callable(w) and w is not DEFAULT else w)
        return result

    return want
