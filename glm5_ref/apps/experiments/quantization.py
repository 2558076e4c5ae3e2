"""Experiment quantization: GLM-5's deployment quantization, its INT4 QAT, the FP8 indexer's scale formats and a
checkpoint larger than memory run layer by layer, measured on the shipped classroom checkpoint.

What it measures (GLM-5 report sections 5 and 2.4.3; glm5_ref/quant.py, fp8.py, streaming.py)
    schemes    on load_pretrained("classroom-base") (bf16 weights, computed in fp32), per scheme: bits per byte on
               held-out test windows of the pretraining corpus (512 tokens), its delta to bf16, the top-1
               next-token agreement with bf16 on the same positions, and the MTP accept length (3 drafts, greedy,
               held-out code prompts of 96 tokens, 128 new tokens: the model card's protocol):
                   bf16                        the reference
                   fp8_block                   the GLM-5-FP8 layout (e4m3 weights, 128 x 128 block scales)
                   w8a8 (+rot)                 W8A8 everywhere, routed experts included
                   w4a8_experts+w8a8 (+rot)    the paper's: routed experts W4A8, attention and MLPs W8A8
               "+rot": the QuaRot Hadamard rotation. The paper's target: W4A8 experts within 0.05 bits/byte.
    qat        INT4 QAT (paper 2.4.3) vs post-training quantization of the same model, w4a8_experts+w8a8: the
               same short fine-tune (pretraining train split, AdamW) run twice, once in bf16 and once through
               the quantised model with straight-through weights; each then quantised offline (export, load);
               bits per byte of both, and of the base model quantised without any fine-tune.
    fp8 indexer  the FP8 indexer simulation's top-k agreement with full precision, amax/448 scales (today's)
               vs ue8m0 (power-of-two, DeepSeek-V3.2's kernels), every layer, 1,024-token windows (top-128 keys).
    streaming  a synthetic checkpoint of several GB (streaming.write_synthetic_checkpoint) decoded layer by layer
               under a 1 GiB weight cap, in a fresh process: seconds per decoded token, bytes read per token,
               peak resident memory (VmHWM); and GLM-5's arithmetic (streaming.bytes_per_token).

Without the shipped checkpoint the full run refuses (ValueError with how to build it); --quick trains a tiny
model for a few steps instead and runs every part at toy sizes into --out. One torch thread (the CPU may be
shared); the JSON records the machine and the wall time.

    python -m glm5_ref experiment quantization [--quick] [--out DIR]
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import torch

from glm5_ref import fp8, quant
from glm5_ref.apps.experiments import write_json
from glm5_ref.config import GLM5Config
from glm5_ref.dsa import fp8_topk_agreement
from glm5_ref.model import GLM5ForCausalLM
from glm5_ref.pretrained import CHECKPOINTS, load_pretrained
from glm5_ref.speculative import speculative_generate
from glm5_ref.streaming import bytes_per_token
from glm5_ref.training.data import BatchSampler, bits_per_byte, build_splits, eval_windows, token_byte_lengths
from glm5_ref.training.engine import Trainer

STEM = "quantization"
SCHEMES = (("bf16", None), ("fp8_block", "fp8"), ("w8a8", ("w8a8", False)), ("w8a8+rot", ("w8a8", True)),
           ("w4a8_experts+w8a8", ("w4a8", False)), ("w4a8_experts+w8a8+rot", ("w4a8", True)))
FULL = dict(windows=32, seq_len=512, prompts=8, new_tokens=128, qat_steps=60, qat_batch=4, qat_seq=256, qat_lr=1e-4,
            indexer_windows=4, indexer_len=1024, stream_gb=4.0, stream_tokens=8)
QUICK = dict(windows=2, seq_len=64, prompts=1, new_tokens=12, qat_steps=2, qat_batch=2, qat_seq=32, qat_lr=1e-4,
             indexer_windows=1, indexer_len=96, stream_gb=0.01, stream_tokens=2)
QAT_SCHEME = ("w4a8", False)


def quantized(model: GLM5ForCausalLM, how) -> GLM5ForCausalLM:
    """The model under one scheme of SCHEMES (None: itself)."""
    if how is None:
        return model
    if how == "fp8":  # every weight the release stores in e4m3, quantised and dequantised in 128 x 128 blocks
        out = GLM5ForCausalLM(model.config)
        out.load_hf_state_dict({n: fp8.dequantize(*fp8.quantize(t)) if fp8.is_fp8_weight(n, tuple(t.shape)) else t
                                for n, t in model.hf_state_dict().items()})
        out.set_execution(model.execution)
        return out.eval()
    return quant.quantize_model(model, *how).eval()


@torch.no_grad()
def score(model, windows: torch.Tensor, byte_lengths: torch.Tensor, batch_size: int = 8):
    """(bits per byte, argmax next-token predictions (W, T)) on fixed windows (W, T + 1)."""
    nats, nbytes, top = 0.0, 0, []
    for chunk in windows.split(batch_size):
        logits = model(chunk).logits[:, :-1].float()  # (B, T, V)
        nats += torch.nn.functional.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten(), reduction="sum").item()
        nbytes += int(byte_lengths[chunk[:, 1:]].sum())
        top.append(logits.argmax(-1))
    return bits_per_byte(nats, nbytes), torch.cat(top)


def accept_length(model, prompts: list[torch.Tensor], new_tokens: int) -> float:
    lengths = []
    with torch.no_grad():
        for p in prompts:
            lengths += speculative_generate(model, p, new_tokens, 3)[1].accept_lengths
    return sum(lengths) / max(len(lengths), 1)


def prompts_from(ids: torch.Tensor, n: int, length: int = 96) -> list[torch.Tensor]:
    """Held-out code prompts: the model card's when the pretraining test documents are there, else windows."""
    try:
        from glm5_ref.apps.model_card import held_out_prompts
        return held_out_prompts(n, length)
    except (ValueError, OSError):
        return [ids[None, i * length:(i + 1) * length] for i in range(n)]


def measure_schemes(model, windows, byte_lengths, prompts, new_tokens, log) -> list[dict]:
    rows, ref_top, ref_bpb = [], None, None
    for name, how in SCHEMES:
        t0 = time.perf_counter()
        q = quantized(model, how)
        bpb, top = score(q, windows, byte_lengths)
        if ref_top is None:
            ref_top, ref_bpb = top, bpb
        row = {"scheme": name, "bits_per_byte": bpb, "delta_bits_per_byte": bpb - ref_bpb,
               "top1_agreement": float((top == ref_top).float().mean()),
               "accept_length": accept_length(q, prompts, new_tokens) if model.mtp is not None else None}
        rows.append(row)
        log(f"{name:24s} bpb {bpb:.4f} (delta {row['delta_bits_per_byte']:+.4f}) top-1 {row['top1_agreement']:.4f} "
            f"accept {row['accept_length'] or float('nan'):.2f} ({time.perf_counter() - t0:.0f} s)")
    return rows


def fine_tune(model, train_ids, p: dict, seed: int = 0):
    """A short fine-tune of ``model`` in place (AdamW, constant lr after a warm-up; the DSA stage it runs in)."""
    stage = "sparse" if model.execution.sparse else "dense"
    trainer = Trainer(model, "adamw", p["qat_lr"], weight_decay=0.0, total_steps=p["qat_steps"], warmup=0.1,
                      min_lr_ratio=1.0)
    sampler = BatchSampler(train_ids, p["qat_batch"], p["qat_seq"], seed=seed)
    model.train()
    losses = [float(trainer.step(sampler.next(), stage=stage).loss) for _ in range(p["qat_steps"])]
    return model.eval(), losses


def measure_qat(model, train_ids, windows, byte_lengths, p: dict, log) -> dict:
    """PTQ of the base model; bf16 fine-tune then PTQ; QAT fine-tune then offline quantisation (export, load)."""
    scheme, rot = QAT_SCHEME
    base = score(quant.quantize_model(model, scheme, rot).eval(), windows, byte_lengths)[0]
    t0 = time.perf_counter()
    tuned, ft_losses = fine_tune(_copy(model), train_ids, p)
    ft_bf16 = score(tuned, windows, byte_lengths)[0]
    ft_ptq = score(quant.quantize_model(tuned, scheme, rot).eval(), windows, byte_lengths)[0]
    t1 = time.perf_counter()
    qat, qat_losses = fine_tune(quant.quantize_model(model, scheme, rot, qat=True), train_ids, p)
    plain = _copy(model)
    plain.load_state_dict(qat.state_dict())  # the trained master weights
    served = quant.load_quantized(quant.quantize_model(plain, scheme, rot).eval(), quant.export_quantized(qat))
    qat_bpb = score(served, windows, byte_lengths)[0]
    out = {"scheme": "w4a8_experts+w8a8" + ("+rot" if rot else ""), "steps": p["qat_steps"],
           "tokens": p["qat_steps"] * p["qat_batch"] * p["qat_seq"], "lr": p["qat_lr"],
           "ptq_bits_per_byte": base, "finetune_bf16_bits_per_byte": ft_bf16, "finetune_then_ptq_bits_per_byte": ft_ptq,
           "qat_bits_per_byte": qat_bpb, "qat_minus_ptq_same_finetune": qat_bpb - ft_ptq,
           "finetune_losses": ft_losses, "qat_losses": qat_losses,
           "seconds": {"finetune": t1 - t0, "qat": time.perf_counter() - t1}}
    log(f"QAT: PTQ {base:.4f}, fine-tune bf16 {ft_bf16:.4f} -> PTQ {ft_ptq:.4f}, QAT -> offline {qat_bpb:.4f}")
    return out


def _copy(model: GLM5ForCausalLM) -> GLM5ForCausalLM:
    out = GLM5ForCausalLM(model.config)
    out.load_state_dict(model.state_dict())
    out.set_execution(model.execution)
    return out


@torch.no_grad()
def measure_indexer(model, ids: torch.Tensor, p: dict) -> dict:
    """FP8 indexer top-k agreement per layer, amax vs ue8m0 scales, on real activations."""
    L, n = p["indexer_len"], p["indexer_windows"]
    windows = eval_windows(ids, L, n)[:, :L]
    topk = model.config.index_topk
    res = {"amax": [], "ue8m0": [], "tokens": L, "topk": topk}
    for w in windows:
        x = model.model.embed_tokens(w[None])  # (1, L, d)
        for layer in model.model.layers:
            h = layer.input_layernorm(x)
            c_q = layer.self_attn.q_latent(h)
            for fmt in ("amax", "ue8m0"):
                res[fmt].append(fp8_topk_agreement(layer.self_attn.indexer, h, c_q, topk, scale_format=fmt))
            x = layer(x, None, None, model.execution).hidden
    for fmt in ("amax", "ue8m0"):
        res[f"{fmt}_mean"] = sum(res[fmt]) / len(res[fmt])
    return res


STREAM_SCRIPT = textwrap.dedent("""
    import json, sys, time, torch
    torch.set_num_threads(1)
    from glm5_ref.streaming import LayerwiseGLM5
    def status(key):
        return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
    directory, cap, new = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    with torch.device("meta"):  # the baseline includes torch's meta-kernel machinery (~150 MB, once)
        torch.nn.Linear(2, 2)
    baseline = status("VmRSS:")
    model = LayerwiseGLM5(directory, dtype=torch.bfloat16, memory_cap_bytes=cap)
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    cache = model.new_cache(1, 8 + new)
    model(ids, cache=cache)
    times, read = [], []
    for _ in range(new):
        before, t0 = model.stats["bytes_read"], time.perf_counter()
        model(ids[:, -1:], cache=cache)
        times.append(time.perf_counter() - t0)
        read.append(model.stats["bytes_read"] - before)
    print(json.dumps({"seconds_per_token": sorted(times)[len(times) // 2], "bytes_read_per_token": sum(read) / new,
                      "peak_rss_above_baseline": status("VmHWM:") - baseline,
                      "peak_weights_held": model.stats["peak_held_bytes"]}))
""")


def measure_streaming(p: dict, log) -> dict:
    """A synthetic checkpoint of ``stream_gb`` GB (bf16), decoded layer by layer under a 1 GiB cap."""
    from glm5_ref.streaming import write_synthetic_checkpoint

    quick = p["stream_gb"] < 1
    config = dataclasses.replace(GLM5Config.classroom(), hidden_size=2048, num_hidden_layers=5, num_attention_heads=8,
                                 q_lora_rank=512, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32,
                                 v_head_dim=64, index_n_heads=8, index_head_dim=64, intermediate_size=4096,
                                 moe_intermediate_size=1024, n_routed_experts=64, num_experts_per_tok=4,
                                 num_nextn_predict_layers=0)
    if quick:
        config = dataclasses.replace(config, hidden_size=256, q_lora_rank=64, kv_lora_rank=32, intermediate_size=256,
                                     moe_intermediate_size=64, n_routed_experts=8, num_hidden_layers=2)
    cap = 2**30 if not quick else 6 * 2**20
    with tempfile.TemporaryDirectory(dir=os.environ.get("GLM5_REF_SCRATCH")) as tmp:
        t0 = time.perf_counter()
        total = write_synthetic_checkpoint(Path(tmp) / "synthetic", config, torch.bfloat16, max_shard_bytes=2**30)
        log(f"streaming: wrote a {total / 1e9:.2f} GB synthetic checkpoint in {time.perf_counter() - t0:.0f} s")
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.fspath(Path(__file__).resolve().parents[3])}
        proc = subprocess.run([sys.executable, "-c", STREAM_SCRIPT, os.path.join(tmp, "synthetic"), str(cap),
                               str(p["stream_tokens"])], env=env, capture_output=True, text=True, timeout=3600)
        if proc.returncode:
            raise RuntimeError(f"the streaming measurement failed: {proc.stderr[-2000:]}")
    res = {"checkpoint_bytes": total, "memory_cap_bytes": cap, **json.loads(proc.stdout.strip().splitlines()[-1]),
           "config": {k: getattr(config, k) for k in ("hidden_size", "num_hidden_layers", "n_routed_experts",
                                                      "num_experts_per_tok", "moe_intermediate_size")}}
    glm5 = GLM5Config.glm5()
    res["glm5"] = {"bf16_bytes_per_token": bytes_per_token(glm5, 2), "fp8_bytes_per_token": bytes_per_token(glm5, 1),
                   "experts_per_token": f"{glm5.num_experts_per_tok} of {glm5.n_routed_experts}"}
    log(f"streaming: {res['seconds_per_token']:.2f} s/token, {res['bytes_read_per_token'] / 1e9:.2f} GB read per "
        f"token, peak RSS +{res['peak_rss_above_baseline'] / 2**30:.2f} GiB for a {total / 2**30:.2f} GiB checkpoint")
    return res


def load_model(quick: bool, model_dir: str | None, log):
    """The shipped classroom checkpoint (or ``model_dir``); --quick without it trains a tiny model for a moment."""
    folder = Path(model_dir) if model_dir else CHECKPOINTS / "classroom-base"
    if (folder / "model.safetensors").is_file() or (folder / "model.safetensors.index.json").is_file():
        if (folder / "metrics.json").is_file():
            return load_pretrained("classroom-base", directory=folder)[0], os.fspath(folder)
        model = GLM5ForCausalLM.from_pretrained(folder).eval()
        return model, os.fspath(folder)
    if not quick:
        raise ValueError(f"{os.fspath(folder)} does not exist: the full run measures the shipped classroom checkpoint; "
                         "build it with python -m glm5_ref recipe base && python -m glm5_ref recipe ship")
    config = dataclasses.replace(GLM5Config.tiny(), vocab_size=4112, hidden_size=64, moe_intermediate_size=64,
                                 max_position_embeddings=512, index_topk=16)
    torch.manual_seed(0)
    model = GLM5ForCausalLM(config)
    fine_tune(model, build_splits().train.ids, {**QUICK, "qat_steps": 10, "qat_lr": 1e-2})
    log("no shipped checkpoint: --quick measures a tiny model trained for 10 steps")
    return model.eval(), "tiny model trained for 10 steps (quick)"


def run(quick: bool = False, out_dir: str | None = None, seeds: list[int] | None = None,
        model_dir: str | None = None) -> dict:
    """Measure everything (module docstring) and write <out_dir>/quantization.json and .png."""
    torch.set_num_threads(1)
    p = QUICK if quick else FULL
    out = Path(out_dir or "runs/experiments/quantization")
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[quantization {time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)

    model, source = load_model(quick, model_dir, log)
    splits = build_splits(corpus="pretrain")
    held_out = splits.test if splits.test is not None else splits.val
    L = min(p["seq_len"], model.config.max_position_embeddings - 1)
    windows, byte_lengths = eval_windows(held_out.ids, L, p["windows"]), token_byte_lengths(model.config.vocab_size)
    prompts = prompts_from(held_out.ids, p["prompts"])
    result = {"model": source, "attention": "sparse" if model.execution.sparse else "dense",
              "eval": {"corpus": "pretrain test split", "windows": int(windows.shape[0]), "seq_len": L},
              "accept_length_protocol": {"prompts": len(prompts), "new_tokens": p["new_tokens"], "draft_steps": 3},
              "group_size": quant.GROUP_SIZE}
    result["rows"] = measure_schemes(model, windows, byte_lengths, prompts, p["new_tokens"], log)
    result["qat"] = measure_qat(model, splits.train.ids, windows, byte_lengths, p, log)
    result["fp8_indexer"] = measure_indexer(model, held_out.ids, {**p, "indexer_len": min(
        p["indexer_len"], model.config.max_position_embeddings)})
    log(f"fp8 indexer top-k agreement: amax {result['fp8_indexer']['amax_mean']:.4f}, "
        f"ue8m0 {result['fp8_indexer']['ue8m0_mean']:.4f}")
    result["streaming"] = measure_streaming(p, log)
    result["machine"] = {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                         "python": platform.python_version(), "torch": torch.__version__,
                         "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    result["wall_seconds"] = time.perf_counter() - t_start
    write_json(out / f"{STEM}.json", result)
    plot(result, out / f"{STEM}.png")
    log(f"wrote {out / STEM}.json and .png; the README's table:\n" + markdown(result))
    return result


def markdown(result: dict) -> str:
    """The README's table of a result (python -c "...quantization import markdown; ...")."""
    lines = ["| scheme | bits/byte | delta vs bf16 | top-1 agreement | MTP accept length |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        accept = f"{r['accept_length']:.2f}" if r["accept_length"] is not None else "-"
        lines.append(f"| {r['scheme']} | {r['bits_per_byte']:.4f} | {r['delta_bits_per_byte']:+.4f} | "
                     f"{r['top1_agreement']:.4f} | {accept} |")
    q, ix = result["qat"], result["fp8_indexer"]
    lines.append(f"\nQAT ({q['steps']} steps, {q['tokens']:,} tokens, lr {q['lr']}): PTQ of the base model "
                 f"{q['ptq_bits_per_byte']:.4f}; the same fine-tune in bf16 {q['finetune_bf16_bits_per_byte']:.4f}, "
                 f"then PTQ {q['finetune_then_ptq_bits_per_byte']:.4f}; through QAT, then offline quantised "
                 f"{q['qat_bits_per_byte']:.4f} bits/byte. FP8 indexer top-k agreement ({ix['tokens']} tokens, top-"
                 f"{ix['topk']}): amax/448 {ix['amax_mean']:.4f}, ue8m0 {ix['ue8m0_mean']:.4f}.")
    return "\n".join(lines)


def plot(result: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"][1:]
    names = [r["scheme"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    panels = (("delta_bits_per_byte", "bits/byte minus bf16 (lower is better)"),
              ("top1_agreement", "top-1 agreement with bf16"), ("accept_length", "MTP accept length (3 drafts)"))
    for ax, (key, title) in zip(axes, panels):
        values = [r[key] if r[key] is not None else float("nan") for r in rows]
        ax.barh(names, values, color=["#888" if "fp8" in n else "#4c72b0" if "rot" not in n else "#dd8452"
                                      for n in names])
        if key == "delta_bits_per_byte":
            ax.axvline(0.05, color="red", ls="--", lw=1, label="paper's goal: 0.05")
            ax.legend(loc="lower right", fontsize=8)
        if key == "accept_length" and result["rows"][0]["accept_length"]:
            ax.axvline(result["rows"][0]["accept_length"], color="black", ls=":", lw=1, label="bf16")
            ax.legend(loc="lower right", fontsize=8)
        ax.set_title(title, fontsize=10)
        ax.invert_yaxis()
    q = result["qat"]
    fig.suptitle(f"GLM-5 deployment quantization on {Path(result['model']).name}: QAT {q['qat_bits_per_byte']:.4f} "
                 f"vs PTQ {q['finetune_then_ptq_bits_per_byte']:.4f} bits/byte after the same {q['steps']}-step "
                 "fine-tune", fontsize=11)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
