"""Build notebooks from their sources and execute them, so the committed .ipynb carries fresh outputs.

Source: notebooks/src/NN_name.py in the "percent" format:
    # %% [markdown]
    # # A heading
    # prose ...
    # %%
    code ...
Each `# %%` line starts a code cell, `# %% [markdown]` a markdown cell whose lines lose their leading "# ".

Usage:
    python scripts/nb.py notebooks/src/01_mla.py [more ...]   # build + execute -> notebooks/01_mla.ipynb
    python scripts/nb.py --all                                  # every source
    python scripts/nb.py --no-execute ...                       # build only

The kernel is "python3" (what nbmake uses); execution runs with notebooks/ as the working directory.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"


def parse_percent(text: str) -> nbformat.NotebookNode:
    cells: list[nbformat.NotebookNode] = []
    kind, lines = None, []

    def flush() -> None:
        if kind is None:
            return
        body = "\n".join(lines).strip("\n")
        if kind == "markdown":
            body = "\n".join(l[2:] if l.startswith("# ") else l.lstrip("#") for l in body.split("\n"))
            cells.append(nbformat.v4.new_markdown_cell(body))
        elif body.strip():
            cells.append(nbformat.v4.new_code_cell(body))

    for line in text.split("\n"):
        if line.startswith("# %%"):
            flush()
            kind, lines = ("markdown" if "[markdown]" in line else "code"), []
        else:
            lines.append(line)
    flush()
    nb = nbformat.v4.new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def build(src: Path, execute: bool = True, timeout: int = 600) -> Path:
    nb = parse_percent(src.read_text())
    out = NOTEBOOKS / (src.stem + ".ipynb")
    if execute:
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
