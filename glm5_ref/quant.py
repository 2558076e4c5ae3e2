"""Deployment quantization as GLM-5 ships it: W8A8 for attention and MLPs, W4A8 for the routed experts, an optional
Hadamard rotation against outliers, and INT4 quantization-aware training whose weights equal the offline ones.

What the paper says (GLM-5 report section 5, "Mixed-Precision W4A8 quantization"): to fit on one Atlas 800T A3,
"standard Attention and MLP blocks use W8A8 (INT8), while the MoE experts are compressed to W4A8 (INT4)", with
QuaRot (Ashkboos et al. 2024) "for outlier suppression"; section 2.4.3: "INT4 QAT in the SFT stage", with one
quantization kernel for training and offline quantization that "ensures bitwise-identical behavior".

The arithmetic (fake quantization: integers are simulated exactly as fp32 values, which int8 hardware computes
with int32 accumulation up to the order of the sum):
    int8 weight, per output channel o     s_o   = max_i |W[o, i]| / 127          Wq = clamp(round(W / s_o), -127, 127)
    int4 weight, per group of G inputs     s_o,g = max_{i in g} |W[o, i]| / 7     Wq in [-7, 7]
    int8 activation, per token t (dynamic) s_t   = max_i |x[t, i]| / 127          xq = clamp(round(x / s_t), -127, 127)
    y = (s_t xq) (s Wq)^T                  (round = half to even; an all-zero row or group keeps scale 1e-12)
    rotation (QuaRot): y = x W^T = (x H)(W H)^T for H orthogonal, so quantising x H and W H instead spreads an
    outlier channel over its Hadamard block before rounding. H is block-diagonal: normalised Sylvester-Hadamard
    blocks of the largest power of two dividing the input width (768 -> 3 blocks of 256; GLM-5's 6144 -> 3 of 2048).

Where (``quantize_model``; the released FP8 layout, fp8.py, keeps the same modules in high precision):
    W8A8           q_a_proj, q_b_proj, kv_a_proj_with_mqa, o_proj, the indexer's wq_b and wk, the dense SwiGLU,
                   the shared expert
    W8 (weights)   kv_b_proj: its weight is quantised in place, its input (the cached latent) is not, because the
                   absorbed decode path multiplies the latent by pieces of that weight (mla.py) and both paths
                   must compute one function (tested)
    W4A8 / W8A8    the routed experts (scheme "w4a8" / "w8a8"): ``QuantMoE``, a subclass of MoE whose
                   ``expert_outputs`` runs the packed experts, fake-quantised: "grouped" (one grouped GEMM per
                   projection over the quantised packed weights) and its naive twin "loop" (one expert at a time)
    high precision the embedding, lm_head, the router, the indexer's weights_proj, norms, the MTP layer's eh_proj

How it fits the model: ``quantize_model(model, scheme)`` returns a deep copy in which those nn.Linear modules are
``QuantLinear`` (the master weight keeps its name, ``weight``, so state_dict names are the checkpoint's) and each MoE
is a ``QuantMoE``. Execution (execution.py) is untouched: a quantised model is another model, not another path.

QAT (``qat=True``): every forward fake-quantises the weights afresh from the trainable master weights, with the
straight-through estimator (forward: deq(Q(W)) exactly; backward: the gradient reaches W unchanged). The weights
a QAT forward uses come from the same function as ``export_quantized`` (integers + scales, int4 packed two per
byte) and ``load_quantized`` (the inference path), so they are bitwise identical (tested).

Packed int4: two's complement nibbles along the input dim, element 2j in the low nibble of byte j and 2j+1 in
the high nibble: (out, in) int4 -> (out, in / 2) uint8.
Choices where the paper is silent (reference/post_training_sources.md section 9: msModelSlim's granularities are
not published): symmetric quantisation everywhere; per-channel int8 weights; int4 groups of GROUP_SIZE = 64 input
channels; dynamic per-token int8 activations (the expert down projection's input: per token-slot); the rotation
applied online at each quantised linear (QuaRot fuses most rotations into the neighbouring weights, which
changes where the RMSNorm gain sits but not what the rotation is for); no calibration (no AWQ-style scaling).
Not handled: real int8/int4 kernels, static activation scales, KV-cache quantisation, GPTQ/AWQ calibration.
Axes: N tokens (or token-slots), E experts, I expert width, d hidden, G group size.
"""

from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from glm5_ref.layers import grouped_mm, grouped_mm_supported
from glm5_ref.moe import MoE, sort_by_expert

GROUP_SIZE = 64
SCHEMES = ("w8a8", "w4a8")
W8A8_LINEARS = ("q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "o_proj", "wq_b", "wk", "gate_proj", "up_proj",
                "down_proj")


@dataclass(frozen=True)
class QuantSpec:
    w_bits: int = 8                 # 8 or 4
    group_size: int | None = None   # None: one scale per output channel; else per group of inputs
    a_bits: int | None = 8          # 8: dynamic per-token int8 activations; None: weight-only
    rotate: bool = False            # block-diagonal Hadamard on the input dim (QuaRot)


# ---- the quantisers ----------------------------------------------------------------------------------------------
def quantize_weight(w: torch.Tensor, bits: int, group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., out, in) -> (q int8 (..., out, in) in [-(2^(b-1) - 1), 2^(b-1) - 1], scale fp32 (..., out, groups))."""
    if bits not in (4, 8):
        raise ValueError(f"bits: expected 4 or 8, got {bits!r}")
    n = w.shape[-1]
    g = n if group_size is None else group_size
    if g < 1 or n % g:
        raise ValueError(f"group_size: expected a divisor of the input width {n}, got {group_size!r}")
    qmax = 2 ** (bits - 1) - 1
    wg = w.float().unflatten(-1, (n // g, g))  # (..., out, groups, G)
    scale = wg.abs().amax(-1).clamp_min(1e-12) / qmax  # (..., out, groups)
    q = torch.round(wg / scale[..., None]).clamp(-qmax, qmax)
    return q.flatten(-2).to(torch.int8), scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """(q int8 (..., out, in), scale (..., out, groups)) -> fp32 (..., out, in): q times its group's scale."""
    groups = scale.shape[-1]
    return (q.float().unflatten(-1, (groups, q.shape[-1] // groups)) * scale[..., None]).flatten(-2)


def fake_quantize_weight(w: torch.Tensor, bits: int, group_size: int | None = None) -> torch.Tensor:
    return dequantize_weight(*quantize_weight(w, bits, group_size))


def fake_quantize_activation(x: torch.Tensor, bits: int = 8) -> torch.Tensor:
    """Dynamic symmetric per-token (per last-dim row) quantisation, dequantised, in fp32."""
    qmax = 2 ** (bits - 1) - 1
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True).clamp_min(1e-12) / qmax  # (..., 1)
    return torch.round(xf / scale).clamp(-qmax, qmax) * scale


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """int8 values in [-8, 7], (..., n) with n even -> uint8 (..., n / 2): low nibble = even index."""
    if q.shape[-1] % 2 or q.dtype != torch.int8 or (q.numel() and (int(q.min()) < -8 or int(q.max()) > 7)):
        raise ValueError(f"pack_int4 q: expected int8 values in [-8, 7] with an even last dim, got {q.dtype} "
                         f"{tuple(q.shape)}")
    nib = (q.to(torch.int16) & 0xF).to(torch.uint8)  # two's complement nibbles
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: uint8 (..., n / 2) -> int8 (..., n)."""
    nib = torch.stack([packed & 0xF, packed >> 4], dim=-1).flatten(-2).to(torch.int8)  # (..., n) in [0, 15]
    return torch.where(nib >= 8, nib - 16, nib)


@functools.lru_cache(maxsize=16)
def _hadamard(n: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / math.sqrt(n)).float()


def hadamard_block(n: int) -> int:
    """The largest power of two dividing n: the block of the block-diagonal rotation of an n-wide input."""
    return n & -n


def rotate(x: torch.Tensor) -> torch.Tensor:
    """x (..., n) @ blockdiag(H_b, ..., H_b) in fp32, b = hadamard_block(n); orthogonal, so it preserves x . y."""
    n = x.shape[-1]
    b = hadamard_block(n)
    return (x.float().unflatten(-1, (n // b, b)) @ _hadamard(b).to(x.device)).flatten(-2)


class _StraightThrough(torch.autograd.Function):
    """forward: the fake-quantised weight exactly; backward: the gradient to the master weight unchanged."""

    @staticmethod
    def forward(ctx, w, wq):
        return wq

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def effective_weight(w: torch.Tensor, spec: QuantSpec, ste: bool = False) -> torch.Tensor:
    """deq(Q(W H)) (H only with spec.rotate), fp32: the weight a quantised forward multiplies by. ``ste``: keep
    autograd's view of it as W itself (QAT)."""
    with torch.no_grad():
        wq = fake_quantize_weight(rotate(w) if spec.rotate else w, spec.w_bits, spec.group_size)
    return _StraightThrough.apply(w, wq) if ste else wq


def quantize_input(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    x = rotate(x) if spec.rotate else x.float()
    return fake_quantize_activation(x, spec.a_bits) if spec.a_bits else x


# ---- the modules ------------------------------------------------------------------------------------------------
class QuantLinear(nn.Module):
    """A bias-free nn.Linear computed as y = Q_a(x H) deq(Q_w(W H))^T. ``weight`` is the master weight (the
    checkpoint's tensor); for inference (qat=False) the quantised weight is computed once and cached."""

    def __init__(self, linear: nn.Linear, spec: QuantSpec, qat: bool = False):
        super().__init__()
        if linear.bias is not None:
            raise ValueError("QuantLinear: expected a bias-free nn.Linear (GLM-5 has no biases)")
        self.weight, self.spec, self.qat = linear.weight, spec, qat
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._cache = None if qat else effective_weight(self.weight, spec)

    def quantized_weight(self) -> torch.Tensor:
        return effective_weight(self.weight, self.spec, ste=self.training) if self.qat else self._cache

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(quantize_input(x, self.spec), self.quantized_weight()).to(x.dtype)

    def export(self) -> dict[str, torch.Tensor]:
        """The offline-quantised weight: integers (int4 packed) and scales, from the current master weight."""
        w = rotate(self.weight.detach()) if self.spec.rotate else self.weight.detach()
        q, scale = quantize_weight(w, self.spec.w_bits, self.spec.group_size)
        return {"weight_packed" if self.spec.w_bits == 4 else "weight_int8": pack_int4(q) if self.spec.w_bits == 4
                else q, "weight_scale": scale}

    def load(self, stored: dict[str, torch.Tensor]) -> None:
        """The inference path: the cached weight from exported integers and scales (then qat is off)."""
        q = unpack_int4(stored["weight_packed"]) if "weight_packed" in stored else stored["weight_int8"]
        self._cache, self.qat = dequantize_weight(q, stored["weight_scale"]), False

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.spec}, qat={self.qat}"


class QuantMoE(MoE):
    """MoE whose routed experts run fake-quantised (``expert_spec``); the router stays in high precision, the shared
    expert is a SwiGLU of QuantLinears. Built from an MoE by ``from_moe`` (the parameters are shared, not copied)."""

    @classmethod
    def from_moe(cls, moe: MoE, expert_spec: QuantSpec, qat: bool = False) -> "QuantMoE":
        q = cls.__new__(cls)
        nn.Module.__init__(q)
        q.config, q.gate, q.experts, q.shared_experts = moe.config, moe.gate, moe.experts, moe.shared_experts
        q._packed, q._packed_addresses = moe._packed, moe._packed_addresses
        q.expert_spec, q.qat = expert_spec, qat
        q._cache = None
        if not qat:
            with torch.no_grad():
                q._cache = q._quantized_packed()
        return q

    def _quantized_packed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Fake-quantised gate|up (E, 2I, d) and down (E, d, I), rotated on their input dims when asked."""
        gate_up, down = self.packed_expert_weights()  # differentiable views under autograd (QAT)
        ste = self.qat and torch.is_grad_enabled()
        return effective_weight(gate_up, self.expert_spec, ste), effective_weight(down, self.expert_spec, ste)

    def quantized_experts(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._quantized_packed() if self.qat else self._cache

    def expert_outputs(self, h, topk_idx, topk_weight, impl: str = "grouped", use_triton: bool = False):
        """y_t = sum_k w_{t,k} FFN_q,e(h_t) with every expert projection quantised (h (N, d) -> (N, d))."""
        if impl not in ("grouped", "loop"):
            raise ValueError(f"MoE impl: expected one of ('grouped', 'loop'), got {impl!r}")
        gate_up, down = self.quantized_experts()  # (E, 2I, d), (E, d, I) fp32
        I, spec = self.config.moe_intermediate_size, self.expert_spec
        xq = quantize_input(h, spec)  # (N, d): per token, the same for each of its experts
        y = torch.zeros(h.shape, dtype=torch.float32, device=h.device)  # (N, d)
        if impl == "loop" or not grouped_mm_supported(torch.float32, h.device, h.shape[1], I):
            counts = torch.bincount(topk_idx.flatten(), minlength=len(self.experts)).tolist()
            for e, n in enumerate(counts):
                if n:
                    tok, slot = torch.where(topk_idx == e)  # tokens that chose e, and in which of their K slots
                    g, u = (xq[tok] @ gate_up[e].T).split(I, dim=-1)  # (n_e, I) each
                    m = quantize_input(F.silu(g) * u, spec)  # (n_e, I)
                    y.index_add_(0, tok, (m @ down[e].T) * topk_weight[tok, slot, None])
            return y.to(h.dtype)
        order, token_of_slot, counts = sort_by_expert(topk_idx, len(self.experts))  # (S,), (S,), (E,)
        offs = counts.cumsum(0).to(torch.int32)  # (E,) end of each expert's segment
        g, u = grouped_mm(xq[token_of_slot], gate_up.transpose(1, 2), offs).chunk(2, dim=-1)  # (S, I) each
        m = quantize_input(F.silu(g) * u, spec)  # (S, I): per token-slot
        ys = grouped_mm(m, down.transpose(1, 2), offs) * topk_weight.reshape(-1)[order, None]  # (S, d)
        return y.index_add_(0, token_of_slot, ys).to(h.dtype)

    def export(self) -> dict[str, torch.Tensor]:
        """Integers (int4 packed) and scales of every routed expert, named as the checkpoint names the weights."""
        gate_up, down = (t.detach() for t in self.packed_expert_weights())
        out, I, spec = {}, self.config.moe_intermediate_size, self.expert_spec
        for which, packed in (("gate_up", gate_up), ("down", down)):
            q, scale = quantize_weight(rotate(packed) if spec.rotate else packed, spec.w_bits, spec.group_size)
            ints = pack_int4(q) if spec.w_bits == 4 else q
            for e in range(len(self.experts)):
                parts = {"down_proj": slice(None)} if which == "down" else {"gate_proj": slice(0, I),
                                                                           "up_proj": slice(I, 2 * I)}
                for proj, rows in parts.items():
                    kind = "weight_packed" if spec.w_bits == 4 else "weight_int8"
                    out[f"experts.{e}.{proj}.{kind}"] = ints[e, rows].contiguous()
                    out[f"experts.{e}.{proj}.weight_scale"] = scale[e, rows].contiguous()
        return out

    def load(self, stored: dict[str, torch.Tensor]) -> None:
        """The inference path: the quantised packed experts from exported integers and scales (then qat is off)."""
        def weight(e: int, proj: str) -> torch.Tensor:
            ints = stored.get(f"experts.{e}.{proj}.weight_packed")
            q = unpack_int4(ints) if ints is not None else stored[f"experts.{e}.{proj}.weight_int8"]
            return dequantize_weight(q, stored[f"experts.{e}.{proj}.weight_scale"])
        E = len(self.experts)
        self._cache = (torch.stack([torch.cat([weight(e, "gate_proj"), weight(e, "up_proj")]) for e in range(E)]),
                       torch.stack([weight(e, "down_proj") for e in range(E)]))
        self.qat = False


# ---- the model ----------------------------------------------------------------------------------------------------
def quantize_model(model: nn.Module, scheme: str = "w4a8", rotate_inputs: bool = False,
                   group_size: int = GROUP_SIZE, qat: bool = False) -> nn.Module:
    """A deep copy of ``model`` with GLM-5's deployment quantization (module docstring): attention and MLPs W8A8,
    kv_b_proj W8 weight-only, routed experts W4A8 (``scheme="w4a8"``, int4 groups of ``group_size``) or W8A8
    (``"w8a8"``). ``rotate_inputs``: the QuaRot Hadamard rotation; ``qat``: fake-quantise on every forward with the
    straight-through estimator (training). The original model is left as it was."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme: expected one of {SCHEMES}, got {scheme!r}")
    linear = QuantSpec(8, None, 8, rotate_inputs)
    experts = QuantSpec(4, group_size, 8, rotate_inputs) if scheme == "w4a8" else linear
    out = copy.deepcopy(model)
    routed = {id(e) for m in out.modules() if isinstance(m, MoE) for e in m.experts}  # quantised by QuantMoE
    for parent in list(out.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, MoE):
                setattr(parent, name, QuantMoE.from_moe(child, experts, qat))
            elif isinstance(child, nn.Linear) and name == "kv_b_proj" and not qat:
                with torch.no_grad():  # weight-only int8, in place (module docstring)
                    child.weight.copy_(effective_weight(child.weight, QuantSpec(8, None, None)))
            elif isinstance(child, nn.Linear) and name in W8A8_LINEARS and id(parent) not in routed:
                setattr(parent, name, QuantLinear(child, linear, qat))
    return out


def export_quantized(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every quantised weight's integers and scales, under the module's name (X.weight_packed / weight_int8 and
    X.weight_scale): what an offline quantiser writes and ``load_quantized`` reads."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantMoE)):
            out.update({f"{name}.{k}": v for k, v in m.export().items()})
    return out


def load_quantized(model: nn.Module, stored: dict[str, torch.Tensor]) -> nn.Module:
    """Set every quantised module of ``model`` (from quantize_model) to the stored integers and scales."""
    for name, m in model.named_modules():
        if isinstance(m, (QuantLinear, QuantMoE)):
            prefix = name + "."
            m.load({k[len(prefix):]: v for k, v in stored.items() if k.startswith(prefix)})
    return model
