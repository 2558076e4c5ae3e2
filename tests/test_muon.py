"""Tests of glm5_ref.muon: Newton-Schulz properties, Muon against torch.optim.Muon and a float64 reference,
Muon Split (one head = plain, heads independent, layouts round-trip), build_optimizer grouping, schedulers,
state-dict resume, convergence, bad input."""

from __future__ import annotations

import dataclasses

import io
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from glm5_ref.layers import RMSNorm
from glm5_ref.muon import Muon, head_blocks, kv_head_blocks, merge_rows, muon_update, newton_schulz, scale_factor, split_rows
from glm5_ref.training.optim import CombinedOptimizer, build_optimizer
from glm5_ref.config import GLM5Config
from glm5_ref.mla import MLA
from tests.strategies import randn, seeds

dims = st.integers(min_value=1, max_value=40)


def singular_values(X: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(X.double())


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# ---------------------------------------------------------------------------------------------------------
# Newton-Schulz
@given(m=dims, n=dims, seed=seeds)
def test_ns_of_transpose_is_transpose(m, n, seed):
    G = randn(seed, m, n)
    a, b = newton_schulz(G.T), newton_schulz(G).T
    if m != n:  # tall inputs are transposed internally, so both sides run the very same arithmetic
        assert torch.equal(a, b)
    else:  # square: X X^T versus X^T X, equal up to rounding
        assert rel_err(a, b) < 1e-5


@given(m=dims, n=dims, seed=seeds, k=st.integers(min_value=-20, max_value=20), c=st.floats(1e-3, 1e3))
def test_ns_is_scale_invariant(m, n, seed, k, c):
    G = randn(seed, m, n)
    assert torch.equal(newton_schulz(G * 2.0**k), newton_schulz(G))  # powers of two scale exactly
    assert rel_err(newton_schulz(G * c), newton_schulz(G)) < 1e-5


@st.composite
def spectra(draw, low_exp: float = -6.0):
    """G = U diag(s) V^T with random orthogonal U, V and log-uniform s in [10^low_exp, 1]."""
    m, n, seed = draw(dims), draw(dims), draw(seeds)
    k = min(m, n)
    U, _ = torch.linalg.qr(randn(seed, m, k))
    V, _ = torch.linalg.qr(randn(seed + 1, n, k))
    s = 10.0 ** (low_exp * torch.rand(k, generator=torch.Generator().manual_seed(seed)))
    return (U * s) @ V.T


@given(G=st.one_of(spectra(), st.builds(lambda m, n, s: randn(s, m, n), dims, dims, seeds)))
def test_ns_singular_values_at_most_1_21(G):
    # the 5-step quintic maps (0, 1] into (0, 1.2024]; the Frobenius normalisation puts every sigma in (0, 1]
    assert singular_values(newton_schulz(G)).max() <= 1.21


@given(G=st.one_of(spectra(low_exp=-1.0),
                   st.builds(lambda m, r, s: randn(s, r * m, m), st.integers(1, 24), st.integers(4, 8), seeds)))
def test_ns_well_conditioned_maps_into_band(G):
    # "Well-conditioned" here: every singular value of G / ||G||_F is at least 0.02 (checked, not assumed):
    # e.g. Gaussian matrices with aspect ratio >= 4 or spectra within one decade. The 5-step map sends
    # [0.008, 1] into [0.6818, 1.1344]. (Square Gaussian matrices can have sigma_min / ||G||_F << 0.02.)
    s = singular_values(G)
    assume(s.min() / s.norm() >= 0.02)
    out = singular_values(newton_schulz(G))
    assert 0.68 <= out.min() and out.max() <= 1.14


@given(m=dims, n=dims, seed=seeds, batch=st.integers(2, 4))
@settings(max_examples=10)
def test_ns_batch_elements_are_independent(m, n, seed, batch):
    # a matrix's result does not depend on the other matrices in its batch (exactly: Muon Split's head
    # independence rests on it), and equals the unbatched result up to rounding (a batched matmul may use
    # another kernel than a single one, so the last bits can differ)
    G = randn(seed, batch, m, n)
    out = newton_schulz(G)
    other = G.clone()
    other[1:] = randn(seed + 1, batch - 1, m, n) * 100
    assert torch.equal(newton_schulz(other)[0], out[0])
    for i in range(batch):
        assert rel_err(out[i], newton_schulz(G[i])) < 1e-5


def test_ns_bad_input_and_zero():
    with pytest.raises(ValueError, match="G"):
        newton_schulz(torch.ones(3))
    with pytest.raises(ValueError, match="steps"):
        newton_schulz(torch.ones(3, 3), steps=-1)
    assert torch.equal(newton_schulz(torch.zeros(4, 3)), torch.zeros(4, 3))  # no NaN from a zero gradient


# ---------------------------------------------------------------------------------------------------------
# plain Muon against its oracles
def run_steps(opt_factory, W0: torch.Tensor, grads: list[torch.Tensor]) -> torch.Tensor:
    p = nn.Parameter(W0.clone())
    opt = opt_factory([p])
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach()


@given(m=dims, n=dims, seed=seeds, fn=st.sampled_from(["original", "match_rms_adamw"]), nesterov=st.booleans())
@settings(max_examples=12)
def test_muon_matches_torch_optim_muon(m, n, seed, fn, nesterov):
    W0, grads = randn(seed, m, n) * 0.1, [randn(seed + 1 + t, m, n) for t in range(10)]
    kw = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=nesterov, adjust_lr_fn=fn)
    ours = run_steps(lambda ps: Muon(ps, ns_dtype=torch.bfloat16, **kw), W0, grads)
    ref = run_steps(lambda ps: torch.optim.Muon(ps, **kw), W0, grads)
    assert rel_err(ours, ref) < 1e-3
    assert rel_err(ours - W0, ref - W0) < 1e-3  # the accumulated update too (measured: bit-identical)


def reference_muon_float64(W0, grads, lr, wd, mu, nesterov, fn, eps=1e-7):
    """The update formula written out directly in float64."""
    a, b, c = 3.4445, -4.7750, 2.0315
    W, M = W0.double(), torch.zeros_like(W0, dtype=torch.float64)
    for g in grads:
        g = g.double()
        M = mu * M + (1 - mu) * g
        X = (1 - mu) * g + mu * M if nesterov else M
        tall = X.shape[0] > X.shape[1]
        X = X.T if tall else X
        X = X / max(X.norm().item(), eps)
        for _ in range(5):
            A = X @ X.T
            X = a * X + (b * A + c * A @ A) @ X
        X = X.T if tall else X
        m, n = W.shape
        s = math.sqrt(max(1, m / n)) if fn == "original" else 0.2 * math.sqrt(max(m, n))
        W = W * (1 - lr * wd) - lr * s * X
    return W


@given(m=dims, n=dims, seed=seeds, fn=st.sampled_from(["original", "match_rms_adamw"]), nesterov=st.booleans())
@settings(max_examples=12)
def test_muon_fp32_matches_float64_formula(m, n, seed, fn, nesterov):
    W0, grads = randn(seed, m, n) * 0.1, [randn(seed + 1 + t, m, n) for t in range(10)]
    ours = run_steps(lambda ps: Muon(ps, lr=0.02, adjust_lr_fn=fn, nesterov=nesterov,
                                     ns_dtype=torch.float32), W0, grads)
    ref = reference_muon_float64(W0, grads, 0.02, 0.1, 0.95, nesterov, fn)
    # measured worst over 150 random cases: 1.9e-6 (params), 1.6e-6 (update alone)
    assert rel_err(ours, ref) < 5e-6
    assert rel_err(ours - W0, ref - W0) < 5e-6


def test_muon_update_is_the_first_step():
    W0, G = randn(0, 12, 7), randn(1, 12, 7)
    p = nn.Parameter(W0.clone())
    p.grad = G.clone()
    Muon([p], lr=0.1, weight_decay=0.1, adjust_lr_fn="match_rms_adamw").step()
    U = (1 - 0.95) * G + 0.95 * (1 - 0.95) * G  # Nesterov look-ahead from a zero momentum buffer
    expected = W0 * (1 - 0.1 * 0.1) - 0.1 * muon_update(U, adjust_lr_fn="match_rms_adamw")
    assert rel_err(p.detach(), expected) < 1e-6


# ---------------------------------------------------------------------------------------------------------
# Muon Split
def split_vs_plain(blocks, shape, seed, steps=3, **kw):
    W0, grads = randn(seed, *shape), [randn(seed + 1 + t, *shape) for t in range(steps)]
    split = run_steps(lambda ps: Muon([{"params": ps, "blocks": [blocks]}], lr=0.05, **kw), W0, grads)
    plain = run_steps(lambda ps: Muon(ps, lr=0.05, **kw), W0, grads)
    return split, plain


@pytest.mark.parametrize("fn", ["original", "match_rms_adamw"])
@pytest.mark.parametrize("split_scale", ["block", "matrix"])
def test_split_with_one_head_equals_plain_muon_exactly(fn, split_scale):
    for shape in [(48, 20), (20, 48), (17, 17)]:
        split, plain = split_vs_plain(head_blocks(shape[0], 1), shape, seed=3, adjust_lr_fn=fn,
                                      split_scale=split_scale)
        assert torch.equal(split, plain)


@given(H=st.integers(2, 4), k=st.integers(1, 9), v=st.integers(1, 9), n=st.integers(2, 12), seed=seeds,
       split_kv=st.booleans(), data=st.data())
@settings(max_examples=10)
def test_perturbing_one_head_leaves_the_others_unchanged(H, k, v, n, seed, split_kv, data):
    blocks, per = kv_head_blocks(H, k, v, split_kv=split_kv), k + v
    W0, grads = randn(seed, H * per, n), [randn(seed + 1 + t, H * per, n) for t in range(3)]
    j = data.draw(st.integers(0, H - 1))
    bumped = [g.clone() for g in grads]
    for g in bumped:
        g[j * per:(j + 1) * per] = 100 * g[j * per:(j + 1) * per] + randn(seed, per, n)
    factory = lambda ps: Muon([{"params": ps, "blocks": [blocks]}], lr=0.05, adjust_lr_fn="match_rms_adamw")
    a, b = run_steps(factory, W0, grads), run_steps(factory, W0, bumped)
    others = torch.ones(H * per, dtype=torch.bool)
    others[j * per:(j + 1) * per] = False
    assert torch.equal(a[others], b[others])
    assert not torch.equal(a[~others], b[~others])


def test_split_equalizes_per_head_update_scale():
    # 8 heads of 16 rows, head 0's gradient x100: whole-matrix NS gives head 0 most of the update; per-head
    # NS gives every head the same update RMS (each block is orthogonalized to singular values ~1).
    H, rows, n = 8, 16, 32
    G = randn(0, H * rows, n)
    G[:rows] *= 100
    rms = lambda U: [U[h * rows:(h + 1) * rows].pow(2).mean().sqrt().item() for h in range(H)]
    plain = rms(muon_update(G, adjust_lr_fn="match_rms_adamw"))
    split = rms(muon_update(G, head_blocks(rows, H), adjust_lr_fn="match_rms_adamw"))
    assert plain[0] > 1.5 * max(plain[1:])
    assert max(split) / min(split) < 1.1


def test_split_scale_block_vs_matrix():
    G, blocks = randn(0, 24, 10), kv_head_blocks(2, 4, 8)  # blocks of 4 and 8 rows
    for fn in ["original", "match_rms_adamw"]:
        by_block = muon_update(G, blocks, adjust_lr_fn=fn, split_scale="block")
        by_matrix = muon_update(G, blocks, adjust_lr_fn=fn, split_scale="matrix")
        for s, e in blocks:
            O = newton_schulz(G[s:e])
            assert rel_err(by_block[s:e], O * scale_factor((e - s, 10), fn)) < 1e-5
            assert rel_err(by_matrix[s:e], O * scale_factor((24, 10), fn)) < 1e-5


@st.composite
def row_tilings(draw):
    sizes = draw(st.lists(st.integers(1, 7), min_size=1, max_size=6))
    stops = [sum(sizes[:i + 1]) for i in range(len(sizes))]
    return list(zip([0] + stops[:-1], stops))


@given(blocks=row_tilings(), n=st.integers(1, 9), seed=seeds)
@settings(max_examples=15)
def test_split_merge_round_trip(blocks, n, seed):
    W = randn(seed, blocks[-1][1], n)
    parts = split_rows(W, blocks)
    assert [tuple(p.shape) for p in parts] == [(e - s, n) for s, e in blocks]
    assert torch.equal(merge_rows(parts, blocks, W.shape), W)


def test_mla_layouts_match_the_per_head_reshape():
    """The blocks come from the attention module itself (MLA.muon_blocks), checked against a per-head view."""
    cfg = dataclasses.replace(GLM5Config.tiny(), num_attention_heads=3, qk_nope_head_dim=5, qk_rope_head_dim=2,
                              v_head_dim=4)
    mla = MLA(cfg)
    b = mla.muon_blocks()
    kv = mla.kv_b_proj.weight.detach()
    heads = kv.view(3, 9, cfg.kv_lora_rank)  # (H, k_nope + v, C): the Hugging Face kv_b_proj layout
    parts = split_rows(kv, b["kv_b_proj.weight"])
    for h in range(3):
        assert torch.equal(parts[2 * h], heads[h, :5]) and torch.equal(parts[2 * h + 1], heads[h, 5:])
    assert b["q_b_proj.weight"] == head_blocks(7, 3)
    assert mla.muon_blocks(split_q_rope=True)["q_b_proj.weight"] == kv_head_blocks(3, 5, 2)
    assert mla.muon_blocks(split_kv=False)["kv_b_proj.weight"] == head_blocks(9, 3)


@pytest.mark.parametrize("blocks", [[(0, 3), (4, 8)], [(0, 5), (4, 8)], [(0, 4)], [(0, 9)], [(0, 0), (0, 8)],
                                    [(1, 8)], "nonsense"])
def test_bad_blocks_raise(blocks):
    with pytest.raises(ValueError, match="blocks"):
        split_rows(torch.zeros(8, 2), blocks)
    with pytest.raises(ValueError, match="blocks"):
        Muon([{"params": [nn.Parameter(torch.zeros(8, 2))], "blocks": [blocks]}])


# ---------------------------------------------------------------------------------------------------------
# build_optimizer on a stand-in model (the MLA parameter names, a muon_blocks method, the usual rest)
CFG = SimpleNamespace(num_attention_heads=2, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=3,
                      q_lora_rank=6, kv_lora_rank=5, hidden_size=8, vocab_size=11)


class Attention(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c, H, N, P, V = c, c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=False)
        self.q_a_layernorm = RMSNorm(c.q_lora_rank)
        self.q_b_proj = nn.Linear(c.q_lora_rank, H * (N + P), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.kv_lora_rank + P, bias=False)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, H * (N + V), bias=False)
        self.o_proj = nn.Linear(H * V, c.hidden_size, bias=False)

        self.num_heads, self.nope_dim, self.rope_dim, self.v_dim = H, N, P, V

    muon_blocks = MLA.muon_blocks  # the real module's layout method, on the stand-in's attributes

    def forward(self, x):  # not attention, but every parameter gets a gradient through the MLA shapes
        c, H, N, P = self.c, self.c.num_attention_heads, self.c.qk_nope_head_dim, self.c.qk_rope_head_dim
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))).unflatten(-1, (H, N + P))  # (B, T, H, N+P)
        kv_a = self.kv_a_proj_with_mqa(x)  # (B, T, C + P)
        kv = self.kv_b_proj(self.kv_a_layernorm(kv_a[..., :c.kv_lora_rank])).unflatten(-1, (H, -1))  # (B,T,H,N+V)
        gate = torch.sigmoid((q[..., :N] * kv[..., :N]).sum(-1, keepdim=True) + q[..., N:].mean(-1, keepdim=True)
                             + kv_a[..., c.kv_lora_rank:].mean(-1)[..., None, None])  # (B, T, H, 1)
        return self.o_proj((gate * kv[..., N:]).flatten(-2))  # (B, T, D)


class StandIn(nn.Module):
    def __init__(self, c=CFG, layers=2):
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(nn.ModuleDict(dict(
            input_layernorm=RMSNorm(c.hidden_size), self_attn=Attention(c),
            post_attention_layernorm=RMSNorm(c.hidden_size), mlp=nn.Linear(c.hidden_size, c.hidden_size)))
            for _ in range(layers))
        self.norm = RMSNorm(c.hidden_size)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def forward(self, ids):
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = x + layer["self_attn"](layer["input_layernorm"](x))
            x = x + layer["mlp"](layer["post_attention_layernorm"](x))
        return self.lm_head(self.norm(x))


def loss_of(model, seed):
    ids = torch.randint(0, CFG.vocab_size, (2, 7), generator=torch.Generator().manual_seed(seed))
    return F.cross_entropy(model(ids[:, :-1]).flatten(0, 1), ids[:, 1:].flatten())


def groups_by_name(opt: CombinedOptimizer) -> dict[str, str]:
    out = {}
    for oname, o in opt.optimizers.items():
        for g in o.param_groups:
            for n in g["param_names"]:
                assert n not in out, f"{n} in two groups"
                out[n] = oname if oname == "muon" or g["weight_decay"] else "adamw_no_decay"
    return out


@pytest.mark.parametrize("name", ["adamw", "muon", "muon_split"])
def test_build_optimizer_puts_every_parameter_in_exactly_one_group(name, capsys):
    model = StandIn()
    opt = build_optimizer(model, name, lr=1e-3, verbose=True)
    where = groups_by_name(opt)
    assert set(where) == {n for n, _ in model.named_parameters()}
    for n, p in model.named_parameters():
        if p.dim() < 2:
            assert where[n] == "adamw_no_decay", n
        elif n.startswith(("embed_tokens", "lm_head")) or name == "adamw":
            assert where[n] == "adamw", n
        else:
            assert where[n] == "muon", n
    table = capsys.readouterr().out
    assert "layers.1.self_attn.kv_b_proj.weight" in table and "lm_head.weight" in table
    if name != "adamw":
        g = opt.optimizers["muon"].param_groups[0]
        blocks = dict(zip(g["param_names"], g["blocks"]))
        kv = blocks["layers.0.self_attn.kv_b_proj.weight"]
        assert kv == (kv_head_blocks(2, 4, 3) if name == "muon_split" else None)
        assert blocks["layers.0.self_attn.o_proj.weight"] is None
        assert ("4 blocks of [3, 4] rows" in table) == (name == "muon_split")


def test_build_optimizer_errors():
    model = StandIn()
    model.experts = nn.Parameter(torch.zeros(3, 4, 5))  # stacked 3-D weights fit no group
    with pytest.raises(ValueError, match="experts"):
        build_optimizer(model, "muon", lr=1e-3)
    assert "experts" in groups_by_name(build_optimizer(model, "muon", lr=1e-3, adamw_names={"experts"}))
    model = StandIn()
    model.layers[0]["self_attn"].muon_blocks = lambda: {"nope.weight": [(0, 1)]}
    with pytest.raises(ValueError, match="nope.weight"):
        build_optimizer(model, "muon_split", lr=1e-3)
    with pytest.raises(ValueError, match="name"):
        build_optimizer(StandIn(), "sgd", lr=1e-3)
    with pytest.raises(ValueError, match="lr"):
        build_optimizer(StandIn(), "muon", lr=0.0)


def test_lambda_lr_drives_every_group():
    model = StandIn()
    opt = build_optimizer(model, "muon_split", lr=1e-2, adamw_lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: (step + 1) / 4)
    for step in range(3):
        opt.zero_grad()
        loss_of(model, step).backward()
        opt.step()
        sched.step()
    assert opt.optimizers["muon"].param_groups[0]["lr"] == pytest.approx(1e-2)
    assert all(g["lr"] == pytest.approx(3e-3) for g in opt.optimizers["adamw"].param_groups)
    assert len(opt.param_groups) == 3
    with pytest.raises(NotImplementedError):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, 2))]})


def test_state_dict_round_trip_continues_identically():
    def train(model, opt, sched, seeds_):
        for s in seeds_:
            opt.zero_grad()
            loss_of(model, s).backward()
            opt.step()
            sched.step()

    def fresh(state=None):
        torch.manual_seed(0)
        model = StandIn()
        if state is not None:
            model.load_state_dict(state)
        opt = build_optimizer(model, "muon_split", lr=1e-2)
        return model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 / (1 + s))

    model_a, opt_a, sched_a = fresh()
    train(model_a, opt_a, sched_a, range(6))
    model_b, opt_b, sched_b = fresh()
    train(model_b, opt_b, sched_b, range(3))
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict(), "sched": sched_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf)
    model_c, opt_c, sched_c = fresh(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    sched_c.load_state_dict(ckpt["sched"])
    assert len(opt_c.state) == len(list(model_c.parameters()))
    train(model_c, opt_c, sched_c, range(3, 6))
    for (n, a), (_, c) in zip(model_a.named_parameters(), model_c.named_parameters()):
        assert torch.equal(a, c), n


def test_muon_converges_on_a_quadratic():
    T = randn(0, 24, 16)
    W = nn.Parameter(torch.zeros(24, 16))
    opt = Muon([W], lr=0.1, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / 300)
    first = None
    for _ in range(300):
        opt.zero_grad()
        loss = (W - T).pow(2).sum()
        first = first or loss.item()
        loss.backward()
        opt.step()
        sched.step()
    assert (W - T).pow(2).sum().item() < 1e-3 * first


# ---------------------------------------------------------------------------------------------------------
# bad input
def test_bad_input():
    p = nn.Parameter(torch.zeros(4, 3))
    for lr in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="lr"):
            Muon([p], lr=lr)
    with pytest.raises(ValueError, match="params"):
        Muon([p, nn.Parameter(torch.zeros(3))])
    with pytest.raises(ValueError, match="adjust_lr_fn"):
        Muon([p], adjust_lr_fn="rms")
    with pytest.raises(ValueError, match="momentum"):
        Muon([p], momentum=1.0)


def test_non_finite_gradient_raises_and_changes_nothing():
    p = nn.Parameter(randn(0, 4, 3))
    opt = Muon([p], lr=0.1)
    p.grad = randn(1, 4, 3)
    opt.step()
    before, buf = p.detach().clone(), opt.state[p]["momentum_buffer"].clone()
    p.grad = torch.full((4, 3), float("nan"))
    with pytest.raises(ValueError, match="non-finite"):
        opt.step()
    assert torch.equal(p, before) and torch.equal(opt.state[p]["momentum_buffer"], buf)
    # the combined optimizer checks every parameter before stepping any: an inf in an AdamW parameter stops
    # the Muon step too
    model = StandIn()
    opt = build_optimizer(model, "muon", lr=1e-2)
    loss_of(model, 0).backward()
    model.lm_head.weight.grad[0, 0] = float("inf")
    before = {n: q.detach().clone() for n, q in model.named_parameters()}
    with pytest.raises(ValueError, match="lm_head.weight"):
        opt.step()
    assert all(torch.equal(q, before[n]) for n, q in model.named_parameters())


# ---------------------------------------------------------------------------------------------------------
# the benchmark's matrix list (glm5_ref/bench/muon.py) against the config's exact parameter count
@pytest.mark.parametrize("preset", ["classroom", "glm5"])
def test_bench_matrix_list_covers_every_hidden_matrix(preset):
    from glm5_ref.apps.bench.muon import hidden_matrices
    from glm5_ref.config import GLM5Config

    c = GLM5Config.preset(preset)
    n_blocks = c.num_hidden_layers + c.num_nextn_predict_layers
    not_matrices = (2 * c.vocab_size * c.hidden_size  # embedding and LM head (AdamW)
                    + n_blocks * (c.q_lora_rank + c.kv_lora_rank + 2 * c.index_head_dim)  # latent norms, k_norm
                    + c.param_breakdown(include_mtp=True)["norms"] + 3 * c.hidden_size * c.num_nextn_predict_layers)
    total = sum(m * n for _, (m, n), _ in hidden_matrices(c, tokens=1))
    assert total == c.num_params(include_mtp=True) - not_matrices
