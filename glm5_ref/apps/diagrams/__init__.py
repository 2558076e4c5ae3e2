"""Conceptual diagrams for the notebooks, drawn in code with matplotlib so that they are reproducible and sit
next to the code they explain. This file holds the drawing primitives; each topic has its own module
(``glm5_ref.apps.diagrams.mla`` and so on) with one function per diagram that returns a matplotlib Figure, which
a notebook shows with ``glm5_ref.apps.figures.show_figure``.

    fig, ax = canvas(10, 4)                       # a blank canvas, data coordinates = inches
    a = box(ax, (1, 2), "x (d = 6144)")           # a labelled box centred at (1, 2); returns it
    b = box(ax, (4, 2), "W_DKV", kind="weight")
    arrow(ax, a, b, "down-project")               # an arrow from box edge to box edge, with an optional label
"""

from __future__ import annotations

from dataclasses import dataclass

# one colour per kind of thing, the same in every diagram
COLORS = {
    "tensor": "#dbe9f6",   # activations, caches
    "weight": "#fde2c8",   # learned matrices
    "op": "#e3f1d9",       # operations (softmax, top-k, ...)
    "cache": "#efe0f5",    # what is kept across decode steps
    "note": "#f4f4f4",
    "bad": "#f8d0d0",
}


@dataclass
class Box:
    x: float
    y: float
    w: float
    h: float

    def edge(self, toward: tuple[float, float]) -> tuple[float, float]:
        """The point where the segment from the centre toward `toward` leaves the box."""
        dx, dy = toward[0] - self.x, toward[1] - self.y
        if dx == 0 and dy == 0:
            return self.x, self.y
        sx = (self.w / 2) / abs(dx) if dx else float("inf")
        sy = (self.h / 2) / abs(dy) if dy else float("inf")
        s = min(sx, sy)
        return self.x + dx * s, self.y + dy * s


def canvas(width: float, height: float, title: str = ""):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.set_aspect("equal")
    ax.axis("off")
    if title:
        ax.set_title(title, fontsize=12)
    return fig, ax


def box(ax, xy, text: str, kind: str = "tensor", w: float | None = None, h: float = 0.6, fontsize: float = 9) -> Box:
    from matplotlib.patches import FancyBboxPatch

    if kind not in COLORS:
        raise ValueError(f"kind: expected one of {sorted(COLORS)}, got {kind!r}")
    lines = text.split("\n")
    w = w if w is not None else max(0.9, 0.085 * fontsize / 9 * max(len(l) for l in lines) + 0.3)
    h = max(h, 0.22 * len(lines) + 0.2)
    x, y = xy
    ax.add_patch(FancyBboxPatch((x - w / 2, y - h / 2), w, h, boxstyle="round,pad=0.02,rounding_size=0.08",
                                fc=COLORS[kind], ec="#555555", lw=1))
    ax.text(x, y, text, ha="center", va="center", fontsize=fontsize)
    return Box(x, y, w, h)


def arrow(ax, a, b, text: str = "", color: str = "#333333", style: str = "-|>", offset: float = 0.15,
          fontsize: float = 8, ls: str = "-"):
    """An arrow from a to b (Boxes or points), from edge to edge; `text` sits beside its middle."""
    pa = a.edge((b.x, b.y) if isinstance(b, Box) else b) if isinstance(a, Box) else a
    pb = b.edge((a.x, a.y) if isinstance(a, Box) else a) if isinstance(b, Box) else b
    ax.annotate("", xy=pb, xytext=pa, arrowprops=dict(arrowstyle=style, color=color, lw=1.2, ls=ls,
                                                      shrinkA=1, shrinkB=1))
    if text:
        mx, my = (pa[0] + pb[0]) / 2, (pa[1] + pb[1]) / 2
        vertical = abs(pb[0] - pa[0]) < abs(pb[1] - pa[1])
        ax.text(mx + (offset if vertical else 0), my + (0 if vertical else offset), text, fontsize=fontsize,
                ha="left" if vertical else "center", va="center" if vertical else "bottom", color=color)


def legend(ax, kinds, xy=(0.2, 0.3)):
    """A row of small coloured swatches naming the kinds of box used."""
    from matplotlib.patches import Rectangle

    x, y = xy
    for k in kinds:
        ax.add_patch(Rectangle((x, y - 0.1), 0.3, 0.2, fc=COLORS[k], ec="#555555", lw=0.8))
        ax.text(x + 0.38, y, k, fontsize=8, va="center")
        x += 0.5 + 0.09 * len(k)
