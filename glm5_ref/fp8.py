"""Block-wise FP8 weights, the layout of the DeepSeek-V3 family's FP8 checkpoints and of GLM-5-FP8.

What it is
    A weight W (R, C) is stored as float8 e4m3 values plus one fp32 scale per block of b_r x b_c weights
    (quantization_config {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128],
    "activation_scheme": "dynamic"}; DeepSeek-V3 inference code, transformers' FineGrainedFP8):

        S[i, j]       = max |W| over block (i, j) / 448          448 = the largest finite e4m3 value
        W_fp8         = e4m3(W / S[block of each weight])         round to nearest
        W            ~= W_fp8 * S[block]                           dequantisation ("scale_inv" multiplies)

    stored as ``X.weight`` (F8_E4M3, shape (R, C)) and ``X.weight_scale_inv`` (F32, shape (ceil(R/b_r),
    ceil(C/b_c))): the last block row or column may be partial (GLM-5's kv_a_proj_with_mqa has 576 rows, 4.5
    blocks of 128). "dynamic" activations: the kernels quantise activations on the fly, per token and 128-channel
    group; a checkpoint stores nothing for them, and this module (weights only) does not simulate them.

Which tensors: every 2-D linear weight, except those the release keeps in bf16: the embedding, lm_head, the
router (mlp.gate), the indexer's weights_proj and the MTP layer's eh_proj (transformers loads GLM-5-FP8 with
modules_to_not_convert = mlp.gate, indexer.weights_proj, lm_head; the GLM-5.x FP8 releases keep eh_proj, norms
and the indexer's k_norm in bf16 too, and e_score_correction_bias in fp32). ``is_fp8_weight`` decides.

Choices: scales are computed in fp32 from the weight as given (bf16 or fp32); an all-zero block gets the scale
1e-12/448 floor (its weights stay exactly zero). Dequantisation multiplies in fp32 and casts once to the target
dtype, block row by block row (``dequantize``), so loading never holds a full fp32 copy of a bf16-bound weight.
Not handled: per-tensor or per-channel FP8 (compressed-tensors' "FP8-dynamic" releases), e5m2, FP8 activations.
Axes: R rows (output features), C columns (input features), b_r x b_c the block.
"""

from __future__ import annotations

import torch

E4M3_MAX = 448.0
KEEP_HIGH_PRECISION = ("model.embed_tokens.", "lm_head.", ".mlp.gate.", ".indexer.weights_proj.", ".eh_proj.")


def is_fp8_weight(name: str, shape: tuple[int, ...]) -> bool:
    """Does the released FP8 layout store this tensor (checkpoint name, shape) in e4m3?"""
    dotted = "." + name
    return name.endswith(".weight") and len(shape) == 2 and not any(k in dotted for k in KEEP_HIGH_PRECISION)


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    """Shape of weight_scale_inv for a weight of ``shape``: (ceil(R / b_r), ceil(C / b_c))."""
    (R, C), (br, bc) = shape, block
    return (-(-R // br), -(-C // bc))


def _check(weight: torch.Tensor, block) -> tuple[int, int]:
    if weight.dim() != 2:
        raise ValueError(f"fp8 weight: expected a 2-D (R, C) matrix, got shape {tuple(weight.shape)}")
    if len(block) != 2 or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in block):
        raise ValueError(f"fp8 block: expected two positive integers (rows, cols), got {block!r}")
    return int(block[0]), int(block[1])


def _expand(scale: torch.Tensor, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """(n_r, n_c) block scales -> (rows, cols), one per weight (the partial last blocks cropped)."""
    return scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:rows, :cols]


def quantize(weight: torch.Tensor, block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, torch.Tensor]:
    """W (R, C) -> (W_fp8 (R, C) float8_e4m3fn, weight_scale_inv (ceil(R/b_r), ceil(C/b_c)) fp32)."""
    br, bc = _check(weight, block)
    R, C = weight.shape
    nr, nc = scale_shape((R, C), (br, bc))
    w = torch.zeros(nr * br, nc * bc, dtype=torch.float32, device=weight.device)
    w[:R, :C] = weight.float()  # zero padding never raises a block's max
    blocks = w.reshape(nr, br, nc, bc)  # (n_r, b_r, n_c, b_c)
    scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / E4M3_MAX  # (n_r, n_c)
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).reshape(nr * br, nc * bc)[:R, :C]
    return q.contiguous(), scale


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = (128, 128),
               dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
    """W = W_fp8 * scale_inv[block], computed in fp32 one block row at a time and written in ``dtype`` (or into
    ``out``, a (R, C) tensor of any float dtype). ValueError when the scale's shape does not fit the weight."""
    br, bc = _check(q, block)
    R, C = q.shape
    if tuple(scale_inv.shape) != scale_shape((R, C), (br, bc)):
        raise ValueError(f"weight_scale_inv: expected shape {scale_shape((R, C), (br, bc))} for a ({R}, {C}) "
                         f"weight in blocks of {(br, bc)}, got {tuple(scale_inv.shape)}")
    out = torch.empty(R, C, dtype=dtype, device=q.device) if out is None else out
    for i in range(scale_inv.shape[0]):  # one block row: b_r x C fp32 values at a time
        rows = slice(i * br, min(R, (i + 1) * br))
        n = rows.stop - rows.start
        out[rows] = q[rows].float() * _expand(scale_inv[i:i + 1].float(), n, C, (br, bc))
    return out


def quantize_state_dict(state_dict: dict[str, torch.Tensor], block: tuple[int, int] = (128, 128)
                        ) -> dict[str, torch.Tensor]:
    """The checkpoint tensors in the FP8 layout: each ``is_fp8_weight`` tensor becomes X.weight (e4m3) and
    X.weight_scale_inv (fp32); every other tensor is kept as it is."""
    out: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        if is_fp8_weight(name, tuple(t.shape)) and t.is_floating_point():
            out[name], out[name + "_scale_inv"] = quantize(t.detach(), block)
        else:
            out[name] = t
    return out
