"""The project's own plumbing: pins agree everywhere, CI runs the README's command, notebooks are committed
executed in order without errors and name the kernel nbmake uses."""

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def _name(requirement: str) -> str:
    return re.split(r"[=<>!~;\s\[]", requirement, maxsplit=1)[0].lower()


def _pyproject_pins() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + [r for group in project["optional-dependencies"].values() for r in group]
    pins = {}
    for r in reqs:
        m = re.match(r"^([A-Za-z0-9_.-]+)==([^;\s]+)", r)
        assert m, f"pyproject requirement {r!r} is not pinned with =="
        pins[m.group(1).lower()] = m.group(2)
    return pins


def _environment_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "environment.yml").read_text().splitlines():
        m = re.match(r"^\s*-\s+([A-Za-z0-9_.-]+)==(\S+)\s*$", line)
        if m:
            pins[m.group(1).lower()] = m.group(2)
    return pins


def test_environment_yml_names_the_same_packages_and_versions_as_pyproject():
    assert _environment_pins() == _pyproject_pins()


def test_makefile_installs_the_pinned_torch_first():
    makefile = (ROOT / "Makefile").read_text()
    m = re.search(r"^TORCH_VERSION := (\S+)$", makefile, re.M)
    assert m and m.group(1) == _pyproject_pins()["torch"]


def test_ci_runs_the_readme_test_command():
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make demo" in readme


def test_every_notebook_has_a_source_and_every_source_a_notebook():
    sources = {p.stem for p in (ROOT / "notebooks" / "src").glob("*.py")}
    assert sources == {p.stem for p in NOTEBOOKS}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_notebook_committed_executed_in_order_without_errors(path):
    nb = json.loads(path.read_text())
    assert nb["metadata"]["kernelspec"]["name"] == "python3"
    code = [c for c in nb["cells"] if c["cell_type"] == "code"]
    counts = [c.get("execution_count") for c in code]
    assert code and None not in counts, f"{path.name}: not every code cell was executed"
    assert counts == list(range(1, len(counts) + 1)), f"{path.name}: executed out of order: {counts}"
    errors = [o for c in code for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors, f"{path.name}: holds an error output: {errors[0].get('ename')}"


def test_cli_params_runs():
    out = subprocess.run([sys.executable, "-m", "glm5_ref", "params", "--config", "glm5"],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "743,911,199,232" in out.stdout and "40,833,126,912" in out.stdout


def test_cli_rejects_unknown_config_and_benchmark():
    for args in (["params", "--config", "huge"], ["bench", "no-such-bench"]):
        out = subprocess.run([sys.executable, "-m", "glm5_ref", *args], capture_output=True, text=True, cwd=ROOT,
                             timeout=120)
        assert out.returncode == 2 and "error:" in out.stderr
