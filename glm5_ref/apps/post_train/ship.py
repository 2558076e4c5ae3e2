"""Ship the post-trained chat model next to the base one: glm5_ref/assets/checkpoints/classroom-chat/.

Written atomically (a staging folder, then a rename), in the layout pretrained.py loads and verifies:
    config.json         the released Hugging Face layout
    model.safetensors   the weights in bf16 (one file, about 33 MB; refused above 40 MB)
    metrics.json        the post-training results (the stage-by-skill matrix, context management, the goals), the
                        attention it was trained with, the sha256 of model.safetensors, and "check": the
                        greedy scores of the bf16 weights on the first CHECK_N held-out questions of each family,
                        which tests/test_pretrained_chat.py recomputes from the shipped file
    README.md           the model card: the stages, the measured numbers, how to load it and chat with it
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

CHECK_N = {"reasoning": 16, "instruction": 16, "agentic": 4}


def chat_check(model) -> dict:
    """The evaluation matrix's greedy scores (evaluate.evaluate_policy) on the first CHECK_N held-out examples
    of each family: reasoning accuracy, the instruction pass rate, agentic success."""
    from glm5_ref.apps.post_train.evaluate import EvalConfig, evaluate_policy

    cfg = EvalConfig(reasoning=CHECK_N["reasoning"], general=CHECK_N["instruction"], agentic=CHECK_N["agentic"],
                     reasoning_sampled=1)
    row = evaluate_policy(model, None, cfg)
    return {family: row[family] for family in CHECK_N} | {"n": dict(CHECK_N)}


def bf16_copy(model):
    """The model as the shipped file holds it: every floating tensor rounded to bf16 (computing in fp32)."""
    from glm5_ref.apps.post_train.rollout import push_weights

    rounded = copy.deepcopy(model)
    push_weights(model, rounded, bf16=True)
    return rounded


def _card(m: dict) -> str:
    e = m["eval"]
    rows = "\n".join(f"| {s} | {e[s]['reasoning']:.2f} | {e[s]['agentic']:.2f} | {e[s]['instruction']:.2f} | "
                     f"{(e[s]['style'] or 0):.2f} | {e[s]['mean_tokens']:.1f} |" for s in m["stages"])
    cm = ", ".join(f"{k} {v:.2f}" for k, v in m["context_management"].items())
    goals = ", ".join(f"{k}: {'yes' if v else 'NO'}" for k, v in m["goals"].items())
    t = m.get("timing_s", {})
    stages = ", ".join(f"{k} {v / 60:.1f} min" for k, v in t.items())
    return f"""# classroom-chat: the classroom GLM-5 after GLM-5's post-training

The shipped `classroom-base` ({m['params'] / 1e6:.1f}M parameters: MLA, DSA top-{m['index_topk']}, a
{m['experts']}-expert MoE, MTP) after the post-training pipeline of GLM-5's report (section 3, Figure 5) at
classroom scale: SFT on three task families and the three thinking modes, reasoning RL (GRPO + IcePop), agentic RL
(the asynchronous loop with TITO and double-sided importance sampling), general RL with a hybrid reward (rules, an
outcome reward model, a generative reward model with human-written anchors), and on-policy cross-stage
distillation. Made by `python -m glm5_ref post-train` (glm5_ref/apps/post_train/), never by hand.

```python
import torch
from glm5_ref.chat import parse, render
from glm5_ref.pretrained import load_pretrained
from glm5_ref.tito import CHAT_STOPS

model, tokenizer = load_pretrained("classroom-chat")
ids = render([{{"role": "user", "content": "Compute 4 + 3 - 5."}}], add_generation_prompt=True).ids
out = model.generate(torch.tensor([ids]), 64, stop_tokens=CHAT_STOPS)  # greedy
print(parse(out[0, len(ids):].tolist()))  # {{'content': '2', 'reasoning_content': '4 + 3 = 7\n7 - 5 = 2', ...}}
```

## Held-out skills by stage (greedy decoding)

| stage | reasoning accuracy | agentic success | instruction pass rate | style (GRM, 0-1) | answer tokens |
|---|---|---|---|---|---|
{rows}

Context management on the long-horizon catalog task (window {m['context_management_details']['window']} tokens):
{cm}. Goals of issue #19: {goals}.

The shipped bf16 weights, greedy, on the first held-out questions (`metrics.json` "check", recomputed by the
project's tests): reasoning {m['check']['reasoning']:.3f} ({m['check']['n']['reasoning']} questions), instruction
{m['check']['instruction']:.3f} ({m['check']['n']['instruction']}), agentic {m['check']['agentic']:.3f}
({m['check']['n']['agentic']} episodes).

Wall time per stage: {stages}. Machine: {m['machine']}. Seeds: {m['seeds']}.

## What it can do, and what it cannot

It answers the classroom tasks only: short multi-step arithmetic and assignment traces, catalog lookups with a
calculator, and one-sentence writing with word-count, casing and punctuation constraints. It was pre-trained on
Python source code and never saw general text: anything else gets code-flavoured noise.

## Files

`model.safetensors` (bf16), sha256 `{m['sha256']}`; `config.json`; `metrics.json` (every number above).
"""


def ship_chat_model(model, doc: dict, dest=None) -> Path:
    """Write ``model`` (the final post-trained policy) and ``doc`` (the results) to ``dest`` (module docstring)."""
    from glm5_ref.pretrained import CHECKPOINTS, REBUILD, write_shipped

    dest = Path(dest) if dest is not None else CHECKPOINTS / "classroom-chat"
    doc = {k: v for k, v in doc.items() if k != "config"}
    doc["check"] = chat_check(bf16_copy(model))
    metrics = write_shipped(model, dest, doc, _card, REBUILD["classroom-chat"])
    print(f"[ship] wrote {os.fspath(dest)} ({(dest / 'model.safetensors').stat().st_size / 2**20:.1f} MB, "
          f"sha256 {metrics['sha256'][:16]}...)")
    return dest
