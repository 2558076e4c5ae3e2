"""The base-model recipe (apps/recipe.py) in its quick form, resuming at a stage, and shipping (apps/model_card.py)."""

from __future__ import annotations

import json

import pytest
import torch

from glm5_ref.apps import recipe
from glm5_ref.apps.model_card import ship
from glm5_ref.pretrained import load_pretrained
from glm5_ref.training.checkpoint import read_log, read_trainer_state
from glm5_ref.training.data import Split

pytestmark = pytest.mark.usefixtures("one_thread")


def test_long_stream_packs_modules_before_their_tests_and_repeats_long_documents():
    docs = {"json/decoder.py": 5, "test/test_json/test_decoder.py": 3, "argparse.py": 9, "test/test_argparse.py": 2,
            "zipapp.py": 4}
    names = sorted(docs)
    ids, offsets, n = [], [], 0
    for i, name in enumerate(names):
        offsets.append(n)
        ids += [i] * docs[name]
        n += docs[name]
    stream = recipe.long_stream(Split(torch.tensor(ids), names, offsets, 100), min_long_tokens=5, seed=0)
    order = stream.doc_names
    assert order.index("argparse.py") < order.index("test/test_argparse.py")  # the module, then its test
    assert order.index("json/decoder.py") < order.index("test/test_json/test_decoder.py")
    assert abs(order.index("json/decoder.py") - order.index("test/test_json/test_decoder.py")) <= 2  # adjacent
    assert order.count("argparse.py") == 2 and order.count("json/decoder.py") == 2  # >= 5 tokens: twice
    assert order.count("zipapp.py") == 1 and len(stream) == sum(docs.values()) + 9 + 5
    assert recipe._module_key("test/test_json/test_decoder.py") == recipe._module_key("json/decoder.py")


def test_quick_recipe_runs_every_stage_resumes_and_ships(tmp_path):
    out = tmp_path / "run"
    summary = recipe.run_recipe(quick=True, out_dir=out, progress=False)
    assert [s["name"] for s in summary["stages"]] == ["copy-warmup", "pretrain", "midtrain", "dsa-warmup", "dsa-sparse"]
    states = [read_trainer_state(recipe.stage_dir(out, i, st)) for i, st in enumerate(recipe.QUICK)]
    assert all(s["finished"] for s in states)
    assert states[-1]["attention"] == "sparse" and states[2]["attention"] == "dense"
    assert states[1]["args"]["init_from"].startswith(str(out / "01_copy-warmup"))  # each stage starts from the last
    assert states[2]["args"]["init_from"].startswith(str(out / "02_pretrain"))
    assert states[0]["args"]["random_copy"] and not any(s["args"]["random_copy"] for s in states[1:])  # the copy task
    assert all(s["args"]["repeat_fraction"] == st.repeat > 0 for s, st in zip(states[1:], recipe.QUICK[1:]))
    evals = [r for r in read_log(recipe.stage_dir(out, 1, recipe.QUICK[1])) if r["kind"] == "eval"]
    assert len(evals) >= 2 and all(r["copy_repeat"] > 0 and r["copy_first"] > 0 for r in evals)  # the probe, logged
    with pytest.raises(ValueError, match="--resume"):
        recipe.run_recipe(quick=True, out_dir=out, progress=False)
    again = recipe.run_recipe(quick=True, out_dir=out, resume=True, progress=False)  # everything finished: skipped
    assert [s["train_s"] for s in again["stages"]] == [s["train_s"] for s in summary["stages"]]
    metrics = ship(run_dir=out, quick=True, dest=tmp_path / "shipped")
    model, _ = load_pretrained(directory=tmp_path / "shipped")
    assert model.execution.sparse and json.loads((tmp_path / "shipped" / "metrics.json").read_text()) == metrics
    assert metrics["speculative"]["identical"] and set(metrics["completions"]) and metrics["sha256"]
    assert metrics["copy_probe"]["spans"] == 8 and metrics["check_copy"]["repeat"] > 0


def test_shipping_needs_a_finished_recipe(tmp_path):
    with pytest.raises(ValueError, match="recipe base"):
        ship(run_dir=tmp_path, quick=True, dest=tmp_path / "x")
