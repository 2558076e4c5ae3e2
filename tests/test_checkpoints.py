"""Checkpoints in: single-copy loads (peak resident memory measured), partial loads, the block-wise FP8 layout
(GLM-5-FP8) read and written, and the bad-input errors (hf_io.py, fp8.py, model.from_pretrained)."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from glm5_ref import fp8
from glm5_ref.config import GLM5Config
from glm5_ref.hf_io import CheckpointReader, read_header, read_into
from glm5_ref.model import GLM5ForCausalLM, NotLoaded

ROOT = Path(__file__).resolve().parents[1]
TINY = dataclasses.replace(GLM5Config.tiny(), index_topk=64)


def make_model(seed: int, config: GLM5Config = TINY) -> GLM5ForCausalLM:
    torch.manual_seed(seed)
    model = GLM5ForCausalLM(config)
    with torch.no_grad():  # move the router bias off zero so that it is really loaded
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.01)
    return model.eval()


def test_reader_reads_what_safetensors_reads(tmp_path):
    from safetensors import safe_open

    model = make_model(0).to(torch.bfloat16)
    model.save_pretrained(tmp_path, max_shard_bytes=30_000)
    reader = CheckpointReader(tmp_path)
    assert set(reader.infos) == set(model.hf_state_dict())
    for name, info in reader.infos.items():
        with safe_open(info.path, framework="pt") as f:
            ref = f.get_tensor(name)
        assert torch.equal(reader.load(name, info.dtype), ref), name
        assert torch.equal(reader.load(name, torch.float32), ref.float()), name  # converted in chunks


def test_from_pretrained_reads_experts_into_the_packed_storage_and_never_repacks(tmp_path):
    model = make_model(1)
    model.save_pretrained(tmp_path)
    loaded = GLM5ForCausalLM.from_pretrained(tmp_path)
    for moe in loaded.moe_layers():
        gate_up, down = moe._packed
        assert moe.experts[3].up_proj.weight.data_ptr() == gate_up[3, TINY.moe_intermediate_size:].data_ptr()
        with torch.no_grad():
            assert moe.packed_expert_weights()[1] is down  # the addresses match: no re-pack, no copy
    ids = torch.randint(0, TINY.vocab_size, (2, 70))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    half = GLM5ForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.lm_head.weight.dtype == torch.bfloat16 and half.moe_layers()[0].gate.weight.dtype == torch.float32


# ---- peak resident memory, measured in a fresh process --------------------------------------------------------
MEMORY_SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(1)
    from glm5_ref.config import GLM5Config
    from glm5_ref.model import GLM5ForCausalLM
    def status(key):  # kB -> bytes; VmHWM is this process's own peak (getrusage's maxrss survives exec)
        return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
    with torch.device("meta"):  # the interpreter's baseline includes torch's meta-kernel machinery
        GLM5ForCausalLM(GLM5Config.tiny())
    baseline = status("VmRSS:")
    model = GLM5ForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)
    with torch.no_grad():
        assert all(torch.isfinite(t.sum()) for t in model.state_dict().values())  # every value read and touched
    held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    print(status("VmHWM:") - baseline, held)
""")


@pytest.fixture(scope="module")
def big_checkpoints(tmp_path_factory):
    """A ~280 MB fp32 checkpoint and its ~140 MB bf16 copy (mostly embedding and head: vocab 32768 x 1024)."""
    config = dataclasses.replace(TINY, vocab_size=32768, hidden_size=1024, q_lora_rank=64, kv_lora_rank=32,
                                 intermediate_size=256, moe_intermediate_size=64)
    root = tmp_path_factory.mktemp("big")
    model = make_model(2, config)
    model.save_pretrained(root / "fp32")
    model.to(torch.bfloat16).save_pretrained(root / "bf16")
    return root


@pytest.mark.parametrize("stored", ["fp32", "bf16"])
def test_a_load_peaks_at_the_baseline_plus_the_model_once(big_checkpoints, stored):
    """Peak resident memory (VmHWM) after reading every parameter: at most the interpreter's baseline plus 1.1x
    the bytes the loaded model holds (the checkpoint's bytes for fp32; twice them for a bf16 -> fp32 load, which
    therefore never keeps the bf16 copy: that would be 1.5x)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.fspath(ROOT)}
    p = subprocess.run([sys.executable, "-c", MEMORY_SCRIPT, os.fspath(big_checkpoints / stored)], env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    peak, held = map(int, p.stdout.split())
    assert held > 250 * 2**20
    assert peak <= 1.1 * held, f"peak {peak / 2**20:.0f} MiB above the baseline for a {held / 2**20:.0f} MiB model"


# ---- partial loads ---------------------------------------------------------------------------------------------
def test_partial_load_holds_only_the_chosen_layers_and_runs_them(tmp_path):
    model = make_model(3)
    model.save_pretrained(tmp_path)
    part = GLM5ForCausalLM.from_pretrained(tmp_path, layers=[1])
    assert isinstance(part.model.layers[0], NotLoaded) and part.mtp is None
    assert not any(n.startswith("model.layers.0.") for n in part.state_dict())
    x = torch.randn(2, 9, TINY.hidden_size)
    with torch.no_grad():
        assert torch.equal(part.model.layers[1](x).hidden, model.model.layers[1](x).hidden)
        with pytest.raises(ValueError, match="model.layers.0 was not loaded"):
            part(torch.zeros(1, 3, dtype=torch.long))
    with_mtp = GLM5ForCausalLM.from_pretrained(tmp_path, layers=[0, TINY.num_hidden_layers])
    assert torch.equal(with_mtp.mtp.eh_proj.weight, model.mtp.eh_proj.weight)
    with pytest.raises(ValueError, match="layers"):
        GLM5ForCausalLM.from_pretrained(tmp_path, layers=[TINY.num_hidden_layers + 1])


# ---- FP8 -------------------------------------------------------------------------------------------------------
def dequantize_by_hand(q: torch.Tensor, s: torch.Tensor, block) -> torch.Tensor:
    """The naive twin: every weight times the scale of its block, one weight at a time in Python loops over blocks."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(s.shape[0]):
        for j in range(s.shape[1]):
            rows, cols = slice(i * block[0], (i + 1) * block[0]), slice(j * block[1], (j + 1) * block[1])
            out[rows, cols] = q[rows, cols].float() * float(s[i, j])
    return out


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 40), br=st.integers(1, 16), bc=st.integers(1, 16),
       seed=st.integers(0, 2**16))
def test_fp8_block_quantization_matches_by_hand_and_bounds_the_error(rows, cols, br, bc, seed):
    w = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed)) * 3
    q, s = fp8.quantize(w, (br, bc))
    assert q.dtype == torch.float8_e4m3fn and s.shape == fp8.scale_shape((rows, cols), (br, bc))
    deq = fp8.dequantize(q, s, (br, bc))
    assert torch.equal(deq, dequantize_by_hand(q, s, (br, bc)))
    scale_of_each = s.repeat_interleave(br, 0).repeat_interleave(bc, 1)[:rows, :cols]
    assert bool(((deq - w).abs() <= 2 ** -4 * w.abs() + scale_of_each * 2 ** -9 + 1e-12).all())  # e4m3: 3 bits


def test_fp8_checkpoint_round_trip_and_layout(tmp_path):
    model = make_model(4)
    block = (8, 8)  # tiny widths: several blocks per matrix, partial last blocks (kv_a has 12 rows)
    model.save_pretrained(tmp_path / "fp8", fp8=True, block=block)
    cfg = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [8, 8],
                                          "activation_scheme": "dynamic"}
    header = {}
    for f in (tmp_path / "fp8").glob("*.safetensors"):
        header.update(read_header(os.fspath(f)))
    kv_a = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
    assert header[kv_a].dtype == torch.float8_e4m3fn and header[kv_a + "_scale_inv"].shape == (2, 4)
    for kept in ("lm_head.weight", "model.embed_tokens.weight", "model.layers.1.mlp.gate.weight",
                 "model.layers.0.self_attn.indexer.weights_proj.weight",
                 f"model.layers.{TINY.num_hidden_layers}.eh_proj.weight"):
        assert header[kept].dtype == torch.float32 and kept + "_scale_inv" not in header, kept
    loaded = GLM5ForCausalLM.from_pretrained(tmp_path / "fp8")
    reader = CheckpointReader(tmp_path / "fp8")
    for name, t in loaded.hf_state_dict().items():
        if name in reader.scales:
            info, sinfo = reader.infos[name], reader.scales[name]
            q = read_into(info, torch.empty(info.shape, dtype=info.dtype))
            s = read_into(sinfo, torch.empty(sinfo.shape, dtype=torch.float32))
            assert torch.equal(t, dequantize_by_hand(q, s, block)), name
    original = model.hf_state_dict()
    err = max(float((loaded.hf_state_dict()[n] - w).norm() / w.norm()) for n, w in original.items()
              if n in reader.scales)
    assert err < 0.05
    # written again from the dequantised weights: the same e4m3 values and scales
    loaded.save_pretrained(tmp_path / "again", fp8=True, block=block)
    again = CheckpointReader(tmp_path / "again")
    for name in reader.scales:
        assert torch.equal(again.load(name, torch.float32), reader.load(name, torch.float32)), name
    bf16 = GLM5ForCausalLM.from_pretrained(tmp_path / "fp8", dtype=torch.bfloat16)
    assert torch.equal(bf16.model.layers[0].self_attn.q_b_proj.weight,
                       loaded.model.layers[0].self_attn.q_b_proj.weight.to(torch.bfloat16))


# ---- bad input: ValueError naming the tensor or the setting ------------------------------------------------------
def _edit_checkpoint(src: Path, dst: Path, change) -> Path:
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    state = {}
    for f in src.glob("*.safetensors"):
        state.update(load_file(f))
    cfg = json.loads((src / "config.json").read_text())
    state, cfg = change(state, cfg) or (state, cfg)
    save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("case, match", [
    ("scale_without_weight", "scale without its weight"),
    ("weight_without_scale", "no weight_scale_inv"),
    ("scale_shape", "weight_scale_inv: expected a float scale of shape"),
    ("block_size", "weight_block_size"),
    ("fmt", "quantised checkpoints are not supported"),
    ("no_quantization_config", "no quantization_config"),
    ("tensor_shape", "model.layers.0.self_attn.o_proj.weight: checkpoint"),
    ("tensor_dtype", "lm_head.weight: checkpoint dtype torch.int32"),
])
def test_bad_checkpoints_are_clear_errors(tmp_path, case, match):
    model = make_model(5)
    model.save_pretrained(tmp_path / "fp8", fp8=True, block=(8, 8))
    o = "model.layers.0.self_attn.o_proj.weight"

    def change(state, cfg):
        if case == "scale_without_weight":
            state.pop(o)
        elif case == "weight_without_scale":
            state.pop(o + "_scale_inv")
        elif case == "scale_shape":
            state[o + "_scale_inv"] = state[o + "_scale_inv"][:1]
        elif case == "block_size":
            cfg["quantization_config"]["weight_block_size"] = [0, 128]
        elif case == "fmt":
            cfg["quantization_config"]["fmt"] = "e5m2"
        elif case == "no_quantization_config":
            del cfg["quantization_config"]
        elif case == "tensor_shape":
            state[o], state[o + "_scale_inv"] = fp8.quantize(torch.randn(TINY.hidden_size, 3), (8, 8))
        elif case == "tensor_dtype":
            state["lm_head.weight"] = state["lm_head.weight"].to(torch.int32)
    bad = _edit_checkpoint(tmp_path / "fp8", tmp_path / "bad", change)
    with pytest.raises(ValueError, match=match):
        GLM5ForCausalLM.from_pretrained(bad)


def test_index_errors_name_the_shard_or_the_tensor(tmp_path):
    model = make_model(6)
    model.save_pretrained(tmp_path / "c", max_shard_bytes=30_000)
    index_path = tmp_path / "c" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / "c" / first).rename(tmp_path / "c" / "moved.safetensors")
    with pytest.raises(ValueError, match=first):
        GLM5ForCausalLM.from_pretrained(tmp_path / "c")
    (tmp_path / "c" / "moved.safetensors").rename(tmp_path / "c" / first)
    name = next(n for n, f in index["weight_map"].items() if f != first)
    index["weight_map"][name] = first  # the index points at a shard that does not hold the tensor
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match=f"{name}.*{first}"):
        GLM5ForCausalLM.from_pretrained(tmp_path / "c")


def test_a_checkpoint_without_the_mtp_layer_needs_strict_false(tmp_path):
    from glm5_ref.hf_io import save_checkpoint

    model = make_model(7)
    state = {k: v for k, v in model.hf_state_dict().items() if not k.startswith(model.mtp_prefix())}
    save_checkpoint(tmp_path, state, model.config.to_hf())  # what transformers writes: no MTP layer
    with pytest.raises(ValueError, match="belongs to the MTP layer.*strict=False"):
        GLM5ForCausalLM.from_pretrained(tmp_path)
    loaded = GLM5ForCausalLM.from_pretrained(tmp_path, strict=False)
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)
    assert torch.equal(loaded.mtp.enorm.weight, torch.ones(TINY.hidden_size))  # a fresh initialisation
    assert 0.01 < float(loaded.mtp.eh_proj.weight.detach().std()) < 0.03
