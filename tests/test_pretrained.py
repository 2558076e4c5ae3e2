"""The shipped classroom-base checkpoint: it loads, matches its recorded sha256, reproduces its recorded numbers,
decodes speculatively exactly as it decodes plainly, and a damaged copy is refused with a way to rebuild it."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import glm5_ref
from glm5_ref.pretrained import checkpoint_dir, load_pretrained, read_metrics, verify
from glm5_ref.speculative import speculative_generate
from glm5_ref.training.data import build_splits, eval_windows, evaluate, token_byte_lengths

pytestmark = pytest.mark.usefixtures("one_thread")
FOLDER = checkpoint_dir("classroom-base")


@pytest.fixture(scope="module")
def shipped():
    return load_pretrained("classroom-base")


def test_the_checkpoint_is_small_bf16_and_described_by_its_card(shipped):
    model, tokenizer = shipped
    size = (FOLDER / "model.safetensors").stat().st_size
    assert size <= 40 * 2**20, size
    from safetensors import safe_open
    with safe_open(FOLDER / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    card, metrics = (FOLDER / "README.md").read_text(), read_metrics("classroom-base")
    assert metrics["sha256"] in card and f"{metrics['test_bpb']:.3f}" in card
    stages = [s["name"] for s in metrics["recipe"]["stages"]]  # v1 had no copy warm-up (recipe.py says why)
    assert stages in (["pretrain", "midtrain", "dsa-warmup", "dsa-sparse"],
                      ["copy-warmup", "pretrain", "midtrain", "dsa-warmup", "dsa-sparse"])
    assert model.execution.sparse  # DSA-trained: the indexer's top-k is on
    assert tokenizer.n_vocab == model.config.vocab_size
    assert glm5_ref.load_pretrained is load_pretrained


def test_it_reproduces_its_recorded_validation_bits_per_byte(shipped):
    model, _ = shipped
    from glm5_ref.apps.model_card import CHECK_LEN

    windows = eval_windows(build_splits(corpus="pretrain").val.ids, CHECK_LEN, 4)
    got = evaluate(model, windows, batch_size=4, byte_lengths=token_byte_lengths(model.config.vocab_size))["bpb"]
    assert abs(got - read_metrics("classroom-base")["check_bpb"]) < 0.01


def test_it_reproduces_its_recorded_copy_probe(shipped):
    """The copy probe (nats per token on a span's first occurrence and on its repeat) on the validation spans
    the card recorded, to 0.02 nats. The first shipped version predates the probe in its card."""
    metrics = read_metrics("classroom-base")
    if "check_copy" not in metrics:
        pytest.skip("this shipped version's card predates check_copy (classroom-base v1)")
    from glm5_ref.apps.model_card import CHECK_COPY
    from glm5_ref.training.synthetic import copy_probe

    got = copy_probe(shipped[0], build_splits(corpus="pretrain").val.ids, **CHECK_COPY)
    assert abs(got["first"] - metrics["check_copy"]["first"]) < 0.02
    assert abs(got["repeat"] - metrics["check_copy"]["repeat"]) < 0.02


def test_speculative_greedy_decoding_equals_plain_greedy(shipped):
    model, tokenizer = shipped
    prompt = torch.tensor([tokenizer.encode("def read_lines(filename):\n    with open(filename) as f:\n        ")])
    plain = model.generate(prompt, 40)
    spec, stats = speculative_generate(model, prompt, 40, draft_steps=3)
    assert torch.equal(spec, plain)
    assert stats.accept_length > 1.0  # the MTP layer was trained: some drafts pass


def test_a_damaged_checkpoint_is_refused_with_how_to_rebuild_it(tmp_path):
    copy = tmp_path / "classroom-base"
    shutil.copytree(FOLDER, copy)
    verify(copy)
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match="truncated or altered.*recipe base"):
        load_pretrained(directory=copy)
    (copy / "model.safetensors").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit flipped
    with pytest.raises(ValueError, match="sha256"):
        load_pretrained(directory=copy)
    (copy / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="missing.*model.safetensors.*recipe ship"):
        load_pretrained(directory=copy)
    with pytest.raises(ValueError, match="shipped checkpoints"):
        load_pretrained("classroom-huge")
    metrics = json.loads((FOLDER / "metrics.json").read_text())
    assert len(metrics["sha256"]) == 64
