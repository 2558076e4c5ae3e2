"""Gated DeltaNet (GDN) and SimpleGDN over GLM-5's MLA projections: a linear recurrence instead of softmax.

What it is (Yang, Kautz & Hatamizadeh, "Gated Delta Networks", arXiv 2412.06464, eq. 10)
    Each head keeps a matrix state S (V x K) instead of a cache of keys. With unit q_t, k_t, a decay
    alpha_t in (0, 1] and a write strength beta_t in (0, 1]:

        S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T        o_t = S_t q_t

    i.e. decay the memory, erase what it stored under k_t, write v_t there (the delta rule: one step of
    gradient descent on ||S k_t - v_t||^2 / 2 with step beta_t). ``delta_rule_recurrent`` is this loop, the
    naive twin. ``delta_rule_chunked`` computes the same for training, chunk by chunk (Yang et al. 2024,
    "Parallelizing Linear Transformers with the Delta Rule", the WY / UT representation): inside a chunk with
    cumulative decays gamma_t = alpha_1 ... alpha_t (from the chunk start) and incoming state S_0,

        A_ti = beta_t (gamma_t / gamma_i) k_t . k_i   (i < t)        T = (I + A)^-1     (the UT transform)
        W    = T diag(beta gamma) K        U = T diag(beta) V        u = U - W S_0^T    (the values written)
        O    = diag(gamma) Q S_0^T + (tril(Q K^T) * gamma_t / gamma_i) u
        S_C  = gamma_C S_0 + u^T diag(gamma_C / gamma_i) K

    so the sequential work is one state per chunk, the rest matrix products. The last chunk may be short:
    any length and any chunk size give the recurrent result (tested, forward and gradients).

The layer (``GatedDeltaNet``; ``SimpleGDN`` is the same code, configured by ``DeltaNetOptions``)
    It subclasses MLA only to own MLA's projections under MLA's names, so a dense checkpoint's ``self_attn``
    loads into it (``from_mla``; a DSA indexer is left out) and a 1:1 hybrid is initialised from the dense
    base as GLM-5's continual training is. Per head, q = [q^C; q^R], k = [k^C; k^R] (E = d_n + d_r dims) and
    v (d_v dims) are MLA's expanded-path queries, keys and values. Then (options):
      conv_size   GDN: causal depthwise Conv1d (kernel 4) on q, k, v, then SiLU (the GDN paper, fla's layer);
                  initialised to the identity, so conversion starts from the dense layer's q, k, v.
      gates       GDN: alpha_t = exp(-exp(A_log) softplus(a_proj(x) + dt_bias)), beta_t = sigmoid(b_proj(x))
                  per head (Mamba-2's decay parameterisation, as fla). Without: alpha, beta fixed numbers.
      output_gate GDN: o = RMSNorm_head(o) * SiLU(g_proj(x)) before o_proj. Without: o goes to o_proj as is.
      rope        keep MLA's rotations of q^R, k^R (RoPE at position 0 is the identity, which is how it is off).
    q and k are always L2-normalised per head (parameter-free; it bounds the state: with ||k|| = 1 and beta in
    (0, 1], I - beta k k^T has eigenvalues in [0, 1]). q is scaled by 1/sqrt(E) in GDN (fla's choice; its
    RMSNorm makes the scale moot) and not in SimpleGDN, where o = S q must keep attention's output scale:
    a unit q equal to a stored key reads back exactly the value stored.

SimpleGDN as the paper describes it (GLM-5 report, section 2.1.2)
    "We remove the Conv1d and explicit gating modules entirely and instead directly map the pre-trained Query,
    Key, and Value projection weights into the linear recurrence formulation. This simplification eliminates the
    need for additional parameters." So: conv_size = 0, no output gate, and no gate projections; the
    recurrence still needs a decay and a write strength, which become constants (alpha = beta = 1 by default:
    no forgetting, full overwrite). Zero new parameters (tested). What the paper leaves open, and we chose:
      * whether alpha / beta survive as constants or as parameter-free functions of the input: constants;
      * RoPE: kept (rope=True), so q . k are the dot products the dense layer was trained with; GDN drops it
        (rope=False) and relies on conv + decay for order, as Yang et al. do;
      * the L2 norm of q, k and the q scale (above); GQA -> MLA: GLM-9B is GQA, here the MLA expanded heads are
        the "Q, K, V" (its shared rope key copied to every head);
      * GDN's initialisation from the dense layer (the paper follows Jet-Nemotron's pipeline, unstated here):
        MLA weights copied, conv identity, A_log / dt_bias as fla, new projections N(0, 0.02).

Cost per token per layer (K = E = d_n + d_r, V = d_v; GLM-5 sizes H = 64, K = 256, V = 256)
    state       H * V * K values whatever the context: 4.19M (8 MiB bf16), the MLA cache of 7282 tokens;
                GDN adds (conv_size - 1) * H * (2K + V) values of conv state (0.15M).
    decode      4 H V K multiply-adds for decay, S k, the rank-1 write and S q: 16.8M, the cost of absorbed MLA
                decode over about 240 keys; constant in the context length.
    chunked     per chunk of C tokens and head: C^2 (2K + V) for the in-chunk products, C^3 / 3 for the UT solve,
                about 4 C K V for the state terms: linear in T for a fixed C.
    parameters  SimpleGDN: MLA's, nothing added. GDN adds conv_size * H * (2K + V) + D * H * (V + 2) + V + 2H.

The paper's numbers for these arms (GLM-9B, 1:1 with full attention, 190B tokens at 64K; section 2.1.2)
    Text: GDN "further improve[s] quality but at the cost of additional parameters; SimpleGDN strikes the best
    balance"; the efficient variants keep a gap on fine-grained retrieval, "up to 5.69 points on RULER@128K and
    7.33 on RepoQA@128K". Table 5 (an image; RULER 64K / 128K as transcribed by secondary sources, check the
    PDF): baseline 85.35 / 75.28, GDN 76.76 / 64.00 (-11.28), SimpleGDN 81.76 / 67.03 (-8.25).

Training with Muon (training/optim.py): the conv taps are (F, 1, k) tensors, not matrices; ``adamw_names(model)``
lists them for build_optimizer's ``adamw_names``. Every other new parameter is a matrix (Muon) or a vector (AdamW).

Not handled: negative eigenvalues (beta in (0, 2)), grouped value heads, fused kernels, padding; a recurrent
state cannot be rolled back, so ``DeltaNetCache.truncate`` refuses (speculative decoding needs a state copy).
Axes: B batch, T tokens, H heads, K key dims (= E), V value dims, C chunk, D hidden.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from glm5_ref.config import GLM5Config
from glm5_ref.layers import RMSNorm
from glm5_ref.mla import MLA


# --- the recurrence -----------------------------------------------------------------------------------------
def check_delta_inputs(q, k, v, log_alpha, beta, state) -> None:
    """q, k (B, T, H, K), v (B, T, H, V), log_alpha and beta (B, T, H), state None or (B, H, V, K)."""
    if not isinstance(q, torch.Tensor) or q.dim() != 4:
        raise ValueError(f"q: expected shape (B, T, H, K), got {tuple(getattr(q, 'shape', ())) or type(q).__name__}")
    B, T, H, K = q.shape
    for name, x, shape in (("k", k, (B, T, H, K)), ("log_alpha", log_alpha, (B, T, H)), ("beta", beta, (B, T, H))):
        if not isinstance(x, torch.Tensor) or tuple(x.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape} (as q), got {tuple(getattr(x, 'shape', ()))}")
    if not isinstance(v, torch.Tensor) or v.dim() != 4 or tuple(v.shape[:3]) != (B, T, H):
        raise ValueError(f"v: expected shape ({B}, {T}, {H}, V), got {tuple(getattr(v, 'shape', ()))}")
    if state is not None and tuple(state.shape) != (B, H, v.shape[-1], K):
        raise ValueError(f"state: expected shape {(B, H, v.shape[-1], K)} (B, H, V, K), got {tuple(state.shape)}")


def delta_rule_recurrent(q, k, v, log_alpha, beta, state=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The naive twin: S_t = alpha_t S_{t-1} (I - beta_t k_t k_t^T) + beta_t v_t k_t^T, o_t = S_t q_t, token by
    token. Returns (o (B, T, H, V), final state (B, H, V, K)). q, k as given (normalise them first)."""
    check_delta_inputs(q, k, v, log_alpha, beta, state)
    B, T, H, K = q.shape
    dt = torch.promote_types(q.dtype, torch.float32)  # the state runs in fp32 at least
    S = q.new_zeros(B, H, v.shape[-1], K, dtype=dt) if state is None else state.to(dt)
    outs = []
    for t in range(T):
        qt, kt, vt = q[:, t].to(dt), k[:, t].to(dt), v[:, t].to(dt)  # (B, H, K), (B, H, K), (B, H, V)
        a, b = log_alpha[:, t].to(dt).exp()[..., None, None], beta[:, t].to(dt)[..., None, None]  # (B, H, 1, 1)
        S = a * S  # decay
        S = S + b * torch.einsum("bhv,bhk->bhvk", vt - torch.einsum("bhvk,bhk->bhv", S, kt), kt)
        # (= alpha S (I - beta k k^T) + beta v k^T: erase the old value at k, write v there)
        outs.append(torch.einsum("bhvk,bhk->bhv", S, qt))  # o_t = S_t q_t
    return (torch.stack(outs, dim=1) if outs else v.new_zeros(v.shape)).to(v.dtype), S  # T = 0: the state alone


def delta_rule_chunked(q, k, v, log_alpha, beta, chunk_size: int = 64, state=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same function in chunks of ``chunk_size`` (WY / UT representation inside, recurrence across; module
    docstring). Returns (o (B, T, H, V), final state (B, H, V, K)); the last chunk may be shorter."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: expected a positive integer, got {chunk_size!r}")
    check_delta_inputs(q, k, v, log_alpha, beta, state)
    B, T, H, K = q.shape
    dt = torch.promote_types(q.dtype, torch.float32)
    S = q.new_zeros(B, H, v.shape[-1], K, dtype=dt) if state is None else state.to(dt)
    heads_first = [x.transpose(1, 2).to(dt) for x in (q, k, v, log_alpha, beta)]  # (B, H, T, .), (B, H, T)
    outs = []
    for a in range(0, T, chunk_size):
        o, S = delta_chunk(*(x[:, :, a:a + chunk_size] for x in heads_first), S)
        outs.append(o)
    o = torch.cat(outs, dim=2).transpose(1, 2) if outs else v.new_zeros(v.shape)  # (B, T, H, V); T = 0 allowed
    return o.to(v.dtype), S


def delta_chunk(q, k, v, log_alpha, beta, S) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of L tokens: q, k (B, H, L, K), v (B, H, L, V), log_alpha, beta (B, H, L), incoming S (B, H, V, K)
    -> (o (B, H, L, V), outgoing S)."""
    L = q.shape[2]
    g = log_alpha.cumsum(-1)  # (B, H, L): log gamma_t
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()  # (L, L): i <= t
    decay = (g[..., :, None] - g[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # gamma_t / gamma_i
    A = (beta[..., :, None] * (k @ k.transpose(-1, -2)) * decay).tril(-1)  # (B, H, L, L): strictly lower
    eye = torch.eye(L, dtype=q.dtype, device=q.device)
    T_ut = torch.linalg.solve_triangular(eye + A, eye.expand_as(A), upper=False, unitriangular=True)  # (I + A)^-1
    W = T_ut @ ((beta * g.exp())[..., None] * k)  # (B, H, L, K)
    U = T_ut @ (beta[..., None] * v)  # (B, H, L, V)
    u = U - W @ S.transpose(-1, -2)  # (B, H, L, V): the values actually written
    o = (g.exp()[..., None] * q) @ S.transpose(-1, -2) + ((q @ k.transpose(-1, -2)) * decay) @ u  # (B, H, L, V)
    S = g[..., -1, None, None].exp() * S + (u * (g[..., -1:] - g).exp()[..., None]).transpose(-1, -2) @ k
    return o, S


# --- the layer ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DeltaNetOptions:
    """What separates GDN from SimpleGDN (module docstring)."""
    conv_size: int = 4          # short causal depthwise Conv1d + SiLU on q, k, v; 0 = none
    gates: bool = True          # alpha, beta from projections of x; False = the constants below
    output_gate: bool = True    # RMSNorm per head, times SiLU(g_proj(x))
    rope: bool = False          # keep MLA's RoPE on q^R, k^R
    alpha: float = 1.0          # the constant decay when gates=False, in (0, 1]
    beta: float = 1.0           # the constant write strength when gates=False, in (0, 1]
    scale_q: bool = True        # q * 1/sqrt(K) after the L2 norm
    chunk_size: int = 64        # training chunk length

    def __post_init__(self):
        for name in ("conv_size", "chunk_size"):
            value, low = getattr(self, name), 0 if name == "conv_size" else 1
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name}: expected an integer >= {low}, got {value!r}")
        for name in ("alpha", "beta"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name}: expected a number in (0, 1], got {getattr(self, name)!r}")


GDN_OPTIONS = DeltaNetOptions()
SIMPLE_GDN_OPTIONS = DeltaNetOptions(conv_size=0, gates=False, output_gate=False, rope=True, scale_q=False)
# what GatedDeltaNet adds to MLA's parameters (the options decide which exist); SimpleGDN adds none of them
NEW_PARAMETERS = ("q_conv1d", "k_conv1d", "v_conv1d", "a_proj", "b_proj", "A_log", "dt_bias", "g_proj", "o_norm")


def adamw_names(model: nn.Module) -> list[str]:
    """The GDN conv taps of ``model`` (3-D, and not matrices to orthogonalise): give them to AdamW,
    ``build_optimizer(..., adamw_names=adamw_names(model))`` (training/optim.py)."""
    return [n for n, _ in model.named_parameters() if n.endswith(("q_conv1d.weight", "k_conv1d.weight",
                                                                  "v_conv1d.weight"))]


class DeltaNetCache:
    """Decode state of one GDN layer: S (B, H, V, K), the last conv_size - 1 conv inputs (B, conv_size - 1, F)
    of q, k, v side by side (F channels; None without conv), and the number of tokens seen."""

    def __init__(self, batch_size: int, heads: int, k_dim: int, v_dim: int, conv_size: int = 0,
                 max_len: int | None = None, dtype: torch.dtype = torch.float32, device=None):
        self.batch_size, self.length, self.max_len = batch_size, 0, max_len if max_len is not None else 2**62
        self.state = torch.zeros(batch_size, heads, v_dim, k_dim, dtype=torch.promote_types(dtype, torch.float32),
                                 device=device)
        features = heads * (2 * k_dim + v_dim)
        self.conv = torch.zeros(batch_size, conv_size - 1, features, dtype=dtype, device=device) if conv_size else None

    def truncate(self, new_length: int) -> None:
        if new_length != self.length:
            raise ValueError(f"DeltaNetCache.truncate new_length: expected {self.length} (a recurrent state cannot "
                             f"be rolled back), got {new_length!r}")


def causal_conv(x: torch.Tensor, weight: torch.Tensor, past: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Depthwise causal conv: y_t = sum_j w[:, j] x_{t - k + 1 + j} over (B, T, F) with (F, k) taps, the k - 1
    inputs before x from ``past`` (zeros when None). Returns (y (B, T, F), the last k - 1 inputs)."""
    taps = weight.shape[-1]
    past = x.new_zeros(x.shape[0], taps - 1, x.shape[2]) if past is None else past.to(x.dtype)
    xp = torch.cat([past, x], dim=1)  # (B, k - 1 + T, F)
    y = F.conv1d(xp.transpose(1, 2), weight[:, None], groups=x.shape[2]).transpose(1, 2)  # (B, T, F)
    return y, xp[:, xp.shape[1] - (taps - 1):]


class GatedDeltaNet(MLA):
    """``forward(x, positions, cache, absorbed=False) -> (B, T, D)`` (``absorbed`` is accepted for MLA's call and
    ignored); ``cache`` a ``DeltaNetCache`` (``new_cache``). ``impl``: "chunked" or "recurrent" (the twin)."""

    def __init__(self, config: GLM5Config, layer_idx: int = 0, options: DeltaNetOptions = GDN_OPTIONS):
        super().__init__(config, layer_idx)
        self.options = options
        H, K, V, D = self.num_heads, self.nope_dim + self.rope_dim, self.v_dim, config.hidden_size
        self.k_dim = K
        if options.conv_size:
            for name, width in (("q_conv1d", H * K), ("k_conv1d", H * K), ("v_conv1d", H * V)):
                conv = nn.Conv1d(width, width, options.conv_size, groups=width, bias=False)
                with torch.no_grad():  # the identity, y_t = x_t: conversion starts from the dense q, k, v
                    conv.weight.zero_()[..., -1] = 1.0
                setattr(self, name, conv)
        if options.gates:
            self.a_proj = nn.Linear(D, H, bias=False)
            self.b_proj = nn.Linear(D, H, bias=False)
            self.A_log = nn.Parameter(torch.empty(H).uniform_(1, 16).log())  # decay rates exp(A_log) in [1, 16]
            dt = torch.exp(torch.empty(H).uniform_(math.log(1e-3), math.log(1e-1)))  # time steps, log-uniform
            self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        if options.output_gate:
            self.g_proj = nn.Linear(D, H * V, bias=False)
            self.o_norm = RMSNorm(V, eps=config.rms_norm_eps)

    @classmethod
    def from_mla(cls, attn: MLA, options: DeltaNetOptions | None = None) -> "GatedDeltaNet":
        """A layer of this class with the MLA weights of ``attn`` (a DSAAttention's indexer is left out); the
        parameters MLA lacks keep their initialisation."""
        layer = cls(attn.config, attn.layer_idx, *(() if options is None else (options,)))
        layer = layer.to(device=attn.q_a_proj.weight.device, dtype=attn.q_a_proj.weight.dtype)
        own = set(layer.state_dict())
        missing = layer.load_state_dict({k: v for k, v in attn.state_dict().items() if k in own}, strict=False)[0]
        if any(name.split(".")[0] not in NEW_PARAMETERS for name in missing):
            raise ValueError(f"attn: expected every MLA parameter, missing {sorted(missing)}")
        return layer

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype = torch.float32,
                  device=None) -> DeltaNetCache:
        return DeltaNetCache(batch_size, self.num_heads, self.k_dim, self.v_dim, self.options.conv_size, max_len,
                             dtype=dtype, device=device)

    def qkv(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """MLA's expanded-path q, k (B, T, H, K) and v (B, T, H, V); RoPE off = RoPE at position 0 (identity)."""
        pos = positions if self.options.rope else torch.zeros_like(positions)
        q_nope, q_rope = self.project_q(self.q_latent(x), pos)  # (B, T, H, N), (B, T, H, P)
        latent, k_rope = self.project_kv_latent(x, pos)  # (B, T, C), (B, T, P)
        k_nope, v = self.kv_b_proj(latent).unflatten(-1, (self.num_heads, -1)).split([self.nope_dim, self.v_dim], -1)
        k = torch.cat([k_nope, k_rope[:, :, None].expand(-1, -1, self.num_heads, -1)], dim=-1)
        return torch.cat([q_nope, q_rope], dim=-1), k, v

    def short_conv(self, q, k, v, cache: DeltaNetCache | None):
        """GDN's causal Conv1d + SiLU on q, k, v (their channels side by side); reads and returns the conv state."""
        B, T, H, _ = q.shape
        flat = torch.cat([q.flatten(2), k.flatten(2), v.flatten(2)], dim=-1)  # (B, T, H (2K + V))
        w = torch.cat([self.q_conv1d.weight, self.k_conv1d.weight, self.v_conv1d.weight])[:, 0]  # (F, taps)
        y, past = causal_conv(flat, w, cache.conv if cache is not None else None)
        q, k, v = F.silu(y).split([H * self.k_dim, H * self.k_dim, H * self.v_dim], dim=-1)
        return q.unflatten(-1, (H, -1)), k.unflatten(-1, (H, -1)), v.unflatten(-1, (H, -1)), past

    def gates(self, x: torch.Tensor, T: int, dt: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """log alpha and beta, (B, T, H) each, in dtype dt."""
        if self.options.gates:
            rate = self.A_log.to(dt).exp()  # (H,)
            log_alpha = -rate * F.softplus(self.a_proj(x).to(dt) + self.dt_bias.to(dt))
            return log_alpha, torch.sigmoid(self.b_proj(x).to(dt))
        shape = (x.shape[0], T, self.num_heads)
        return (x.new_full(shape, math.log(self.options.alpha), dtype=dt),
                x.new_full(shape, self.options.beta, dtype=dt))

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None, cache: DeltaNetCache | None = None,
                absorbed: bool = False, *, impl: str = "chunked") -> torch.Tensor:
        if impl not in ("chunked", "recurrent"):
            raise ValueError(f"impl: expected 'chunked' or 'recurrent', got {impl!r}")
        if cache is not None and not isinstance(cache, DeltaNetCache):
            raise ValueError(f"cache: expected a DeltaNetCache (see new_cache), got {type(cache).__name__}")
        B, T = self.check_input(x, None)
        if cache is not None and (cache.batch_size != B or cache.length + T > cache.max_len):
            raise ValueError(f"cache: expected batch {B} and room for {T} tokens, got batch {cache.batch_size}, "
                             f"length {cache.length} of max_len {cache.max_len}")
        positions = self.resolve_positions(positions, B, T, cache, x.device)  # (B|1, T)
        q, k, v = self.qkv(x, positions)
        past = None
        if self.options.conv_size:
            q, k, v, past = self.short_conv(q, k, v, cache)
        dt = torch.promote_types(x.dtype, torch.float32)  # the recurrence runs in fp32 at least
        q = F.normalize(q.to(dt), dim=-1) * (self.k_dim ** -0.5 if self.options.scale_q else 1.0)
        k, v = F.normalize(k.to(dt), dim=-1), v.to(dt)
        log_alpha, beta = self.gates(x, T, dt)
        state = cache.state if cache is not None else None
        if impl == "recurrent" or T == 1:
            o, state = delta_rule_recurrent(q, k, v, log_alpha, beta, state)
        else:
            o, state = delta_rule_chunked(q, k, v, log_alpha, beta, self.options.chunk_size, state)
        if cache is not None:  # written only after every check and computation succeeded
            cache.state, cache.conv, cache.length = state.to(cache.state.dtype), past, cache.length + T
        o = o.to(x.dtype)  # (B, T, H, V)
        if self.options.output_gate:
            o = self.o_norm(o) * F.silu(self.g_proj(x)).unflatten(-1, (self.num_heads, -1))
        return self.o_proj(o.flatten(-2))


class SimpleGDN(GatedDeltaNet):
    """GLM-5's SimpleGDN: the same layer with ``SIMPLE_GDN_OPTIONS`` (no conv, no gates, MLA's weights only)."""

    def __init__(self, config: GLM5Config, layer_idx: int = 0, options: DeltaNetOptions = SIMPLE_GDN_OPTIONS):
        if options.conv_size or options.gates or options.output_gate:
            raise ValueError(f"options: expected no conv, gates or output gate (SimpleGDN adds no parameters), "
                             f"got {options}")
        super().__init__(config, layer_idx, options)
