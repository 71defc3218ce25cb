"""Draws `docs/figures/axes.png`: where the device axis goes in a state whose per-device
shape is (3, 5), on 8 devices, for the axes 0, 1, -1 and None of `state_out_axes`.

Each global array is drawn as the 2-D blocks along its first dimension (a shape
(a, b, c) as a blocks of b x c cells); a cell has the colour of the device that holds
it. A replicated state is one (3, 5) block that every device holds in full.

Run from the repository root with a Python that has matplotlib:

    .venv/bin/pip install matplotlib
    .venv/bin/python docs/scripts/axes_figure.py
"""

import pathlib

import matplotlib


matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch, Rectangle  # noqa: E402


N = 8  # devices
OUT = pathlib.Path(__file__).resolve().parents[1] / "figures" / "axes.png"
# tab10 without its grey, which is kept for replicated cells.
COLOURS = [plt.get_cmap("tab10").colors[i] for i in (0, 1, 2, 3, 4, 5, 6, 8)]
GREY = "#c8c8c8"


def device_of(shape, axis):
    """Per cell of a global array of `shape`: the device holding it (-1: every device)."""
    if axis is None:
        return np.full(shape, -1)
    index = np.arange(N).reshape([N if d == axis else 1 for d in range(len(shape))])
    return np.broadcast_to(index, shape)


def draw(ax, shape, axis, title, note):
    owner = device_of(shape, axis)
    blocks = owner if owner.ndim == 3 else owner[None]
    x0 = 0.0
    for block in blocks:
        rows, cols = block.shape
        for r in range(rows):
            for c in range(cols):
                d = block[r, c]
                ax.add_patch(
                    Rectangle(
                        (x0 + c, -r - 1),
                        1,
                        1,
                        facecolor=GREY if d < 0 else COLOURS[d],
                        edgecolor="white",
                        linewidth=0.8,
                    )
                )
        ax.add_patch(
            Rectangle(
                (x0, -rows), cols, rows, fill=False, edgecolor="black", linewidth=1
            )
        )
        x0 += cols + 1.2
    ax.text(x0 + 0.5, -0.5, note, va="top", fontsize=9)
    ax.set_xlim(-0.3, 64)
    ax.set_ylim(-blocks.shape[1] - 0.3, 0.3)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.set_title(title, loc="left", fontsize=10.5, family="monospace")


PANELS = [
    ((N, 3, 5), 0, "axis 0:    (8, 3, 5), P('devices')", "device d holds\nblock d"),
    (
        (3, N, 5),
        1,
        "axis 1:    (3, 8, 5), P(None, 'devices')",
        "device d holds\nrow d of each block",
    ),
    (
        (3, 5, N),
        2,
        "axis -1:   (3, 5, 8), P(None, None, 'devices')",
        "device d holds\ncolumn d of each block",
    ),
    (
        (3, 5),
        None,
        "axis None: (3, 5), P()",
        "replicated: every device\nholds all of it",
    ),
]


def main():
    rows = [shape[1] if len(shape) == 3 else shape[0] for shape, *_ in PANELS]
    fig, axes = plt.subplots(
        len(PANELS), 1, figsize=(9, 6), gridspec_kw={"height_ratios": rows}
    )
    for ax, (shape, axis, title, note) in zip(axes, PANELS):
        draw(ax, shape, axis, title, note)
    handles = [Patch(color=COLOURS[d], label=f"device {d}") for d in range(N)]
    handles.append(Patch(color=GREY, label="every device"))
    fig.legend(handles=handles, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.suptitle(
        "A state of per-device shape (3, 5) on 8 devices: its global shape and where\n"
        "each cell lives (the blocks along the first dimension; a cell in its device's colour)",
        fontsize=12,
    )
    fig.tight_layout(rect=(0, 0.07, 1, 0.97))
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, dpi=90)
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main()
