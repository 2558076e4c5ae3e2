"""The shipped classroom-chat checkpoint (the post-training pipeline's final model): small, bf16, verified by its
sha256, described by its card, reproduces its recorded held-out scores from the shipped file, answers through
the chat template, and a damaged copy is refused with the command that rebuilds it."""

from __future__ import annotations

import shutil

import pytest
import torch

from glm5_ref.chat import parse, render
from glm5_ref.pretrained import checkpoint_dir, load_pretrained, read_metrics
from glm5_ref.tito import CHAT_STOPS

pytestmark = pytest.mark.usefixtures("one_thread")
FOLDER = checkpoint_dir("classroom-chat")


@pytest.fixture(scope="module")
def chat():
    return load_pretrained("classroom-chat")


def test_the_chat_checkpoint_is_small_bf16_and_described_by_its_card(chat):
    from safetensors import safe_open

    model, tokenizer = chat
    assert (FOLDER / "model.safetensors").stat().st_size <= 40 * 2**20
    with safe_open(FOLDER / "model.safetensors", framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    card, m = (FOLDER / "README.md").read_text(), read_metrics("classroom-chat")
    assert m["sha256"] in card
    assert m["stages"] == ["base", "sft", "reasoning_rl", "agentic_rl", "general_rl", "distill"]
    final = m["eval"]["distill"]
    assert f"| distill | {final['reasoning']:.2f} | {final['agentic']:.2f} | {final['instruction']:.2f} |" in card
    assert model.execution.sparse == (m["attention"] == "sparse")
    assert tokenizer.n_vocab == model.config.vocab_size


def test_it_reproduces_its_recorded_held_out_scores(chat):
    """Greedy decoding of the shipped bf16 weights: the same scores as recorded at ship time (one question of
    slack per family, for a near-tie argmax that another CPU's float rounding could flip)."""
    from glm5_ref.apps.post_train.ship import chat_check

    model, _ = chat
    got, want = chat_check(model), read_metrics("classroom-chat")["check"]
    assert got["n"] == want["n"]
    for family in ("reasoning", "instruction", "agentic"):
        assert abs(got[family] - want[family]) <= 1 / want["n"][family] + 1e-9, (family, got, want)
    assert want["reasoning"] > 0.5  # the post-trained model does the classroom tasks (the base scores ~0)


def test_it_answers_through_the_chat_template(chat):
    model, _ = chat
    ids = render([{"role": "user", "content": "Compute 4 + 3 - 5."}], add_generation_prompt=True).ids
    out = model.generate(torch.tensor([ids]), 48, stop_tokens=CHAT_STOPS)
    msg = parse(out[0, len(ids):].tolist())
    assert set(msg) >= {"content", "reasoning_content", "tool_calls"}
    assert msg["reasoning_content"] and msg["content"].strip()


def test_a_damaged_chat_checkpoint_is_refused_with_how_to_rebuild_it(tmp_path):
    copy = tmp_path / "classroom-chat"
    shutil.copytree(FOLDER, copy)
    data = (copy / "model.safetensors").read_bytes()
    (copy / "model.safetensors").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(ValueError, match="sha256"):
        load_pretrained(directory=copy)
    (copy / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="missing.*post-train --resume"):
        load_pretrained("classroom-chat", directory=copy)
