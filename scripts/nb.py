"""Build notebooks from their jupytext sources and execute them, so the committed .ipynb carries fresh outputs.

Source: notebooks/src/NN_name.py in jupytext's "percent" format, paired with notebooks/NN_name.ipynb
(notebooks/jupytext.toml says so, so JupyterLab with jupytext keeps the two in step when you edit either):
    # %% [markdown]
    # # A heading
    # %%
    code ...
    # %% tags=["solution"] jupyter={"source_hidden": true}
    # solution 1 (a code cell collapsed in JupyterLab)

Usage:
    python scripts/nb.py notebooks/src/01_mla.py [more ...]   # build + execute -> notebooks/01_mla.ipynb
    python scripts/nb.py --all                                  # every source (make notebooks)
    python scripts/nb.py --no-execute ...                       # build only

The kernel is "python3" (what nbmake uses); execution runs with notebooks/ as the working directory and with
GLM5_FIGURES_DIR set to figures/, so the figures a notebook shows are written to the tracked figures/ folder
(glm5_ref/apps/figures.py; anywhere else they go to runs/figures/).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import jupytext
import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
KERNELSPEC = {"name": "python3", "display_name": "Python 3", "language": "python"}


def read_source(src: Path) -> nbformat.NotebookNode:
    """The notebook a percent-format source describes (cells and their metadata; no outputs)."""
    nb = jupytext.read(src, fmt="py:percent")
    nb.metadata = {"kernelspec": dict(KERNELSPEC), "language_info": {"name": "python"}}
    return nb


def build(src: Path, execute: bool = True, timeout: int = 600) -> Path:
    nb = read_source(src)
    out = NOTEBOOKS / (src.stem + ".ipynb")
    if execute:
        os.environ["GLM5_FIGURES_DIR"] = str(ROOT / "figures")
        t0 = time.time()
        NotebookClient(nb, timeout=timeout, kernel_name="python3",
                       resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
        print(f"{out.name}: executed in {time.time() - t0:.1f} s")
    tmp = out.with_suffix(".ipynb.tmp")
    nbformat.write(nb, str(tmp))
    tmp.replace(out)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("sources", nargs="*", type=Path)
    parser.add_argument("--all", action="store_true")
    parser.add_argument("--no-execute", action="store_true")
    args = parser.parse_args()
    sources = sorted((NOTEBOOKS / "src").glob("*.py")) if args.all else args.sources
    if not sources:
        parser.error("give notebook sources or --all")
    for src in sources:
        build(src, execute=not args.no_execute)
    return 0


if __name__ == "__main__":
    sys.exit(main())
