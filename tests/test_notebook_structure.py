"""What every notebook owes its reader, checked on the committed .ipynb files:
- it is the execution of its jupytext source (scripts/nb.py), cell for cell, with the same cell tags;
- its first cell names its prerequisites and an honest reading time;
- its derivation closes with a check cell (first line `# check`) that asserts the derivation equals the package;
- it ends with an "Exercises" section: 2-4 exercises, each with a collapsed solution cell (tag "solution") that
  asserts its answer, so that nbmake checks every solution;
- every image it shows is named in the output's metadata and equals figures/<name> byte for byte
  (glm5_ref/apps/figures.py), and every PNG in figures/ is shown by some notebook (no orphans)."""

import base64
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from nb import read_source  # noqa: E402  (scripts/nb.py: how the committed notebooks are built)

NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
IDS = [p.name for p in NOTEBOOKS]


def _cells(path):
    return json.loads(path.read_text())["cells"]


def _src(cell) -> str:
    s = cell["source"]
    return "".join(s) if isinstance(s, list) else s


def _images(path):
    for cell in _cells(path):
        for out in cell.get("outputs", []):
            if "image/png" in out.get("data", {}):
                yield out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_matches_its_source(path):
    src = ROOT / "notebooks" / "src" / (path.stem + ".py")
    built = [(c["cell_type"], c["source"], c.metadata.get("tags", [])) for c in read_source(src)["cells"]]
    committed = [(c["cell_type"], _src(c), c.get("metadata", {}).get("tags", [])) for c in _cells(path)]
    assert built == committed, f"{path.name} differs from {src.name}: run python scripts/nb.py {src}"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_opens_with_prerequisites_and_reading_time(path):
    first = _src(_cells(path)[0])
    assert "**Prerequisites:**" in first, f"{path.name}: the first cell names no prerequisites"
    assert re.search(r"\*\*Reading time:\*\* about \d+", first), f"{path.name}: the first cell gives no reading time"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_notebook_closes_with_check_then_exercises(path):
    cells = _cells(path)
    heads = [i for i, c in enumerate(cells) if c["cell_type"] == "markdown" and _src(c).startswith("## Exercises")]
    assert len(heads) == 1, f"{path.name}: expected one '## Exercises' section"
    ex = heads[0]
    assert all(c["cell_type"] != "markdown" or not _src(c).startswith("## ") for c in cells[ex + 1:]), \
        f"{path.name}: the Exercises section is not the last section"
    checks = [i for i, c in enumerate(cells[:ex]) if c["cell_type"] == "code" and _src(c).startswith("# check")]
    assert checks and "assert" in _src(cells[checks[-1]]), f"{path.name}: no '# check' cell with an assert"
    solutions = [c for c in cells[ex:] if "solution" in c.get("metadata", {}).get("tags", [])]
    assert 2 <= len(solutions) <= 4, f"{path.name}: {len(solutions)} solution cells (expected 2-4)"
    for c in solutions:
        assert c["cell_type"] == "code" and "assert" in _src(c), f"{path.name}: a solution that asserts nothing"
        assert c["metadata"].get("jupyter", {}).get("source_hidden"), f"{path.name}: a solution is not collapsed"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_every_shown_figure_is_the_file_in_figures(path):
    for out in _images(path):
        name = out.get("metadata", {}).get("image/png", {}).get("filename")
        assert name, f"{path.name}: an image without a file name (use glm5_ref.apps.figures.show_figure)"
        file = ROOT / "figures" / name
        assert file.is_file(), f"{path.name} shows {name}, which figures/ lacks"
        assert base64.b64decode(out["data"]["image/png"]) == file.read_bytes(), \
            f"{path.name}: the embedded {name} differs from figures/{name} (rebuild with scripts/nb.py)"


def test_every_figure_is_shown_by_a_notebook():
    shown = {out.get("metadata", {}).get("image/png", {}).get("filename") for p in NOTEBOOKS for out in _images(p)}
    orphans = sorted(p.name for p in (ROOT / "figures").glob("*.png") if p.name not in shown)
    assert not orphans, f"figures no notebook shows (show them or remove them): {orphans}"
