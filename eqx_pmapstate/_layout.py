"""Layout decisions: pure functions from facts about each output to its axis.

The facts (`OutLeaf`) come from the trace and the dataflow pass; what the caller asked
for (`wanted`: an axis as written, `None` for replicated, or `DEFAULT`) from the filters,
`out_axes`, or the layout of an argument. Nothing here traces or runs anything, so tests
can call these with made-up facts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, NamedTuple

from ._errors import unproved_outputs
from ._tree import path_name


class Default:
    """The type of `eqx_pmapstate.DEFAULT`: nothing asked, the layout rules apply."""

    def __repr__(self):
        return "DEFAULT"


DEFAULT = Default()  # nothing asked: the rule of the caller applies


class Pass(NamedTuple):
    """A decision: hand back input number `input` unchanged."""

    input: int


class Inherited(NamedTuple):
    """What an output asks for under the default rule's first part: the axis of the
    argument whose structure it has, named `source` (for messages)."""

    axis: int | None | Default
    source: str


class Layout(NamedTuple):
    """The decisions for one traced function: per jaxpr output an axis (`int`), None
    (replicated) or `Pass`; and which replicated outputs to check at run time."""

    axes: Sequence
    checked: frozenset = frozenset()


def normalize_axis(axis: int | None, ndim: int, name: Callable[[], str]) -> int | None:
    """Where the new axis lands in an array of `ndim` dimensions, as `jnp.expand_dims` says.
    `name()` names the array in messages: "the state at .w", "the output at output[0]"."""
    if axis is None:
        return None
    pos = axis if axis >= 0 else axis + ndim + 1
    if not 0 <= pos <= ndim:
        raise ValueError(
            f"Axis {axis} is out of range for {name()}, which has {ndim} dimension(s): "
            f"the new axis can go at positions {-(ndim + 1)} to {ndim}."
        )
    return pos


class OutLeaf(NamedTuple):
    """What is known about one array output of a traced per-device function."""

    path: tuple  # its key path in the output
    ndim: int  # its number of dimensions on one device
    varying: bool  # whether it may differ between devices (else proved the same)
    input_index: int | None = None  # the input it is, unchanged, if any
    # The structure of the whole output (a `PyTreeDef`), only to name `path` in messages
    # (`_tree.path_name`: an `eqx.nn.State`'s entries by their layer).
    structure: Any = None
    empty: bool = False  # zero-size: no element can differ between devices


CheckMode = Literal["trace", "runtime", "off"]


def _output_at(leaf: OutLeaf) -> Callable[[], str]:
    """`normalize_axis`'s name for an output of a `pmap2` function."""
    return lambda: "the output at " + output_name(leaf.path, leaf.structure)


def _state_at(leaf: OutLeaf) -> Callable[[], str]:
    """`normalize_axis`'s name for a state made by an initialisation."""
    return lambda: "the state at " + path_name(leaf.path, leaf.structure)


def step_layout(
    leaves: Sequence[OutLeaf],
    wanted: Sequence,
    *,
    check: CheckMode = "trace",
    in_axes: Sequence[int | None] = (),
    passable: frozenset[int] = frozenset(),
    axis_name: str = "devices",
) -> Layout:
    """The layout of the outputs of a `pmap2` function.

    An output asked for nothing (`DEFAULT`) is replicated when it is proved the same on
    every device, and gets a device axis at 0 otherwise. One asked to be replicated that
    is not proved the same (and has elements: a zero-size one cannot differ) is an
    error naming it (`check="trace"`), is compared across
    devices at run time (`"runtime"`), or is taken as it is (`"off"`, `jax.pmap`'s
    behaviour). An output that is input `j` unchanged, wanted on the axis input `j` has,
    is handed back as it is when `j` is in `passable`. An `Inherited` wish is its axis;
    its source is named if the output cannot be replicated.
    """
    axes, checked, unproved, sources = [], set(), [], {}  # sources: a set, in order
    for k, (leaf, want) in enumerate(zip(leaves, wanted, strict=True)):
        source = None
        if isinstance(want, Inherited):
            want, source = want.axis, want.source
        if isinstance(want, Default):
            axis = 0 if leaf.varying else None
        else:
            axis = normalize_axis(want, leaf.ndim, _output_at(leaf))
            if axis is None and leaf.varying and not leaf.empty:
                if check == "trace":
                    unproved.append(output_name(leaf.path, leaf.structure))
                    if source is not None:
                        sources[source] = None
                elif check == "runtime":
                    checked.add(k)
        j = leaf.input_index
        if j is not None and j in passable and in_axes[j] == axis and k not in checked:
            axes.append(Pass(j))
        else:
            axes.append(axis)
    if unproved:
        raise unproved_outputs(unproved, axis_name, tuple(sources))
    return Layout(tuple(axes), frozenset(checked))


def output_name(path, structure: Any = None) -> str:
    """An output leaf for a message: `output[0].w`, or the whole return value.
    `structure`: the output's (or the output itself), to name an `eqx.nn.State`'s
    entries by their layer (`_tree.path_name`)."""
    if not path:
        return "output (the whole return value)"
    return "output" + path_name(path, structure)


def new_states_layout(
    leaves: Sequence[OutLeaf],
    wanted: Sequence,
    held: Mapping[tuple, int],
    check_every_replicated: bool = False,
) -> Layout:
    """The layout of the states made by `pmap2_new_states` / `vmap2_new_states`.

    `held` maps the path of each leaf the module held before initialisation to its input
    number: it must come back unchanged (and is handed back as it is). Every other leaf
    goes to the axis its filters chose (`wanted`, as written); a replicated one that is
    not proved the same everywhere is checked when it is made, and so is every replicated
    one with `check_every_replicated` (with several processes, whose host inputs the
    proof cannot see are the same).
    """
    axes, checked = [], set()
    at = {leaf.path: k for k, leaf in enumerate(leaves)}
    for path, j in held.items():
        k = at.get(path)
        if k is None or leaves[k].input_index != j:
            structure = leaves[0].structure if leaves else None
            raise ValueError(
                f"`init_state` changed the leaf at {path_name(path, structure)}, which "
                "the module already held. Leaves that exist before initialisation come "
                "back unchanged; create new states in `init_state`, or build the whole "
                "tree with a callable instead."
            )
    for k, (leaf, want) in enumerate(zip(leaves, wanted, strict=True)):
        if leaf.path in held:
            axes.append(Pass(held[leaf.path]))
            continue
        axis = normalize_axis(want, leaf.ndim, _state_at(leaf))
        if axis is None and (leaf.varying or check_every_replicated):
            checked.add(k)
        axes.append(axis)
    return Layout(tuple(axes), frozenset(checked))
