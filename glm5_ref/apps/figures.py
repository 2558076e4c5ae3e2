"""How a notebook shows a figure: the PNG it embeds is the PNG it writes, byte for byte.

    show_figure(fig, "01_kv_cache.png")    # a figure the notebook drew: render once, write, embed those bytes
    show_saved("muon_split.png")            # a figure an experiment script wrote to figures/: embed its bytes

Where the files go: `scripts/nb.py` (``make notebooks``), which builds the committed notebooks, sets
GLM5_FIGURES_DIR to the repository's figures/; anything else (nbmake under ``make test``, a reader's own run) writes
to runs/figures/ (untracked), so running the notebooks never modifies a tracked file. The embedded image carries
its file name in the output's metadata (``{"image/png": {"filename": ...}}``);
tests/test_notebook_structure.py checks that every image in a committed notebook is named and equals
figures/<name> byte for byte, and that every PNG in figures/ is shown by some notebook.

PNGs are written without the matplotlib version stamp, so the same figure drawn twice gives the same bytes.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TRACKED = ROOT / "figures"
UNTRACKED = ROOT / "runs" / "figures"


def figures_dir() -> Path:
    """Where show_figure writes: $GLM5_FIGURES_DIR if set (the notebook build), else runs/figures/."""
    return Path(os.environ.get("GLM5_FIGURES_DIR") or UNTRACKED)


def png_bytes(fig, dpi: int = 110) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _embed(data: bytes, name: str):
    from IPython.display import Image, display

    display(Image(data=data, format="png", metadata={"filename": name}))


def show_figure(fig, name: str, dpi: int = 110) -> None:
    """Render `fig` once, write it to figures_dir()/name and embed exactly those bytes; closes the figure.
    Returns nothing, so that a cell ending in it prints no path."""
    import matplotlib.pyplot as plt

    if not name.endswith(".png") or "/" in name:
        raise ValueError(f"name: expected a bare file name ending in .png, got {name!r}")
    data = png_bytes(fig, dpi)
    plt.close(fig)
    path = figures_dir() / name
    _write(path, data)
    _embed(data, name)


def show_saved(name: str) -> None:
    """Embed figures/<name>, a figure that an experiment script wrote (and committed), byte for byte."""
    path = TRACKED / name
    if not path.is_file():
        raise FileNotFoundError(f"name: figures/{name} does not exist (run the experiment that writes it)")
    _embed(path.read_bytes(), name)
