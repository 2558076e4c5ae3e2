"""The CLI end to end on the tiny config: train, generate, demo; clear errors with exit status 2."""

import os
import subprocess
import sys

import pytest
import torch

from glm5_ref.__main__ import main

TRAIN = ["--config", "tiny", "--batch-size", "2", "--seq-len", "16"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *TRAIN, "--steps", "3", "--out", str(out), "--no-progress"]) == 0
    return out


def test_train_writes_a_checkpoint_and_a_log(trained, capsys):
    assert (trained / "checkpoint" / "config.json").is_file()
    assert (trained / "checkpoint" / "training_state.pt").is_file()
    assert (trained / "log.jsonl").is_file()


def test_train_resume_continues(trained, capsys):
    assert main(["train", *TRAIN, "--steps", "4", "--out", str(trained), "--resume", "--no-progress"]) == 0
    assert "trained 4 steps" in capsys.readouterr().out


def test_generate(trained, capsys):
    prompt = "def add(a, b):\n"
    assert main(["generate", "--ckpt", str(trained), "--prompt", prompt, "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out.startswith(prompt)
    assert main(["generate", "--ckpt", str(trained / "checkpoint"), "--prompt", prompt, "--max-new-tokens", "4",
                 "--temperature", "0.8", "--seed", "1"]) == 0


def test_demo_quick_then_reuse(tmp_path, capsys):
    out, figures = tmp_path / "run", tmp_path / "figures"
    args = ["demo", "--config", "tiny", "--quick", "--out", str(out), "--figures", str(figures)]
    assert main(args) == 0
    text = capsys.readouterr().out
    for part in ("GLM-5", "shipped", "speculative decoding", "dense vs DSA", "Training a fresh", "Summary",
                 "bits/byte", "identical ids: True"):
        assert part in text, part
    assert (figures / "live_loss.png").is_file() and (figures / "live_expert_load.png").is_file()
    assert main(args) == 0
    assert "reusing the finished run" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["train", "--config", "huge", "--steps", "1"], "config name 'huge'"),
    (["train", *TRAIN, "--minutes", "0"], "minutes"),
    (["train", *TRAIN, "--steps", "0"], "steps"),
    (["train", *TRAIN], "--minutes"),
    (["demo", "--config", "tiny", "--quick", "--minutes", "1"], "fixed number of steps"),
])
def test_bad_input_exits_2(argv, message, tmp_path, capsys):
    argv = argv + (["--out", str(tmp_path / "x")] if argv[0] == "train" else ["--out", str(tmp_path / "x"),
                                                                             "--figures", str(tmp_path / "f")])
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_generate_from_a_folder_that_is_no_checkpoint(tmp_path, capsys):
    assert main(["generate", "--ckpt", str(tmp_path), "--prompt", "x"]) == 2
    assert "is not a checkpoint" in capsys.readouterr().err


def test_module_entry_point_exit_status(tmp_path):
    run = subprocess.run([sys.executable, "-m", "glm5_ref", "train", "--config", "nope", "--steps", "1", "--out",
                          str(tmp_path / "x")], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 2 and run.stderr.startswith("error: config name 'nope'")


def test_bench_train_step_quick_json(capsys):
    import json

    assert main(["bench", "train-step", "--quick", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for row in rows:
        assert {"name", "glm5_tok_s", "dense_tok_s", "ratio"} <= set(row)
        assert row["glm5_tok_s"] > 0 and row["dense_tok_s"] > 0


def test_train_default_seq_len_fits_the_preset(tmp_path, capsys):
    # the demo's 256 tokens do not fit the tiny preset's 256 positions (+1 for the target): 255 are used
    assert main(["train", "--config", "tiny", "--steps", "1", "--batch-size", "1", "--out", str(tmp_path / "r"),
                 "--no-progress"]) == 0
    assert "trained 1 steps" in capsys.readouterr().out


def test_post_train_quick_through_the_cli(tmp_path, capsys):
    out = tmp_path / "pt"
    assert main(["post-train", "--quick", "--out", str(out)]) == 0
    assert "goals:" in capsys.readouterr().out and (out / "post_training.json").is_file()
    assert main(["post-train", "--quick", "--out", str(out)]) == 2  # exists: needs --resume
    assert main(["post-train", "--quick", "--out", str(out), "--resume"]) == 0
