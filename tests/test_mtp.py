"""Multi-token prediction and speculative decoding: the DeepSeek-V3 formulation by hand, greedy speculative
decoding == plain greedy decoding, the rejection-sampling rule keeps the target distribution, cache rollback,
the checkpoint layout, errors."""

from __future__ import annotations

import copy
import dataclasses
import functools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from glm5_ref.config import GLM5Config
from glm5_ref.model import GLM5ForCausalLM
from glm5_ref.sampling import nucleus_probs
from glm5_ref.speculative import accept_or_resample, speculative_generate
from tests.strategies import seeds

CFG = dataclasses.replace(GLM5Config.tiny(), vocab_size=23, index_topk=6)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


@functools.lru_cache(maxsize=1)
def trained_model() -> GLM5ForCausalLM:
    """A tiny model (main + MTP) fitted to a cyclic token pattern, so that drafts are often right. Trained on one
    thread, so that the same model comes out whatever thread count the test process runs with (a sum split over
    threads rounds differently, and a different model accepts different drafts)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_pattern_model()
    finally:
        torch.set_num_threads(threads)


def _train_pattern_model() -> GLM5ForCausalLM:
    torch.manual_seed(0)
    model = GLM5ForCausalLM(CFG)
    pattern = torch.tensor([3, 7, 1, 9, 4, 4, 12, 5, 18, 2, 7, 11])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        start = torch.randint(0, len(pattern), (8,), generator=g)
        ids = torch.stack([pattern.roll(-int(s)).repeat(3)[:30] for s in start])  # (8, 30)
        out = model(ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return model.double().eval()


# --- the training objective ------------------------------------------------------------------------------
@pytest.mark.parametrize("depths", [1, 2])
def test_mtp_loss_is_the_deepseek_v3_formulation_by_hand(depths):
    torch.manual_seed(1)
    model = GLM5ForCausalLM(CFG).double()
    ids = torch.randint(0, CFG.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    out = model(ids, labels=ids, mtp_depths=depths)
    mtp, T = model.mtp, ids.shape[1]
    h = model.model.norm(out.hidden_states)  # h^0: the main model's normed output (MTP_HIDDEN = "normed")
    for k in range(1, depths + 1):
        emb = model.model.embed_tokens(ids[:, k:])  # Emb(t_{i+k}), i = 0 .. T-k-1
        x = mtp.eh_proj(torch.cat([mtp.enorm(emb), mtp.hnorm(h[:, :T - k])], -1))  # eq. 21, [emb; h] order
        h = mtp.block(x)[0]  # eq. 22: one full decoder block
        logits = model.lm_head(mtp.shared_head.norm(h))  # eq. 23: the shared head
        ce = F.cross_entropy(logits[:, :T - k - 1].reshape(-1, CFG.vocab_size), ids[:, k + 1:].reshape(-1))  # eq. 24
        assert rel(out.mtp_losses[k - 1], ce) < 1e-6  # logits are cast to fp32, as the main head's
    expected = CFG.mtp_loss_weight / depths * torch.stack(out.mtp_losses).sum()  # eq. 25
    assert rel(out.mtp_loss, expected) < 1e-12
    torch.testing.assert_close(out.loss, out.lm_loss + out.balance_loss + out.mtp_loss)


def test_depths_share_one_set_of_parameters():
    torch.manual_seed(2)
    model = GLM5ForCausalLM(CFG)
    ids = torch.randint(0, CFG.vocab_size, (1, 12))
    out = model(ids, labels=ids)
    assert len(out.mtp_losses) == CFG.num_mtp_depths == 3
    grads = torch.autograd.grad(out.mtp_losses[2], list(model.mtp.parameters()), allow_unused=True)
    assert any(g is not None and float(g.abs().max()) > 0 for g in grads)  # depth 3 trains the same module
    assert sum(p.numel() for p in model.mtp.parameters()) == CFG.num_params(include_mtp=True) - CFG.num_params()


def test_mtp_reads_the_normed_hidden_state():
    """h^0 is the final norm's output: changing the final norm's gains (non-uniformly; hnorm would undo a
    uniform scale) changes the MTP loss. Were h^0 taken before the final norm, it would not."""
    torch.manual_seed(3)
    model = GLM5ForCausalLM(CFG).double()
    ids = torch.randint(0, CFG.vocab_size, (1, 10))
    a = model(ids, labels=ids, mtp_depths=1).mtp_losses[0]
    with torch.no_grad():
        model.model.norm.weight.mul_(torch.linspace(0.2, 3.0, CFG.hidden_size, dtype=torch.float64))
    b = model(ids, labels=ids, mtp_depths=1).mtp_losses[0]
    assert rel(a, b) > 1e-4


# --- speculative decoding ----------------------------------------------------------------------------------
@settings(max_examples=8)
@given(seed=seeds, draft_steps=st.integers(1, 4), prompt_len=st.integers(1, 9), trained=st.booleans())
def test_greedy_speculative_decoding_returns_plain_greedy_ids(seed, draft_steps, prompt_len, trained):
    if trained:
        model = trained_model()
    else:
        torch.manual_seed(seed % 1000)
        model = GLM5ForCausalLM(CFG).double().eval()
    prompt = torch.randint(0, CFG.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(seed))
    plain = model.generate(prompt, 20)
    with pytest.warns(UserWarning) if draft_steps > CFG.num_mtp_depths else _no_warning():
        spec, stats = speculative_generate(model, prompt, 20, draft_steps)
    assert torch.equal(spec, plain)
    assert 1 <= stats.accept_length <= draft_steps + 1


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_trained_mtp_drafts_are_accepted_and_the_formula_holds():
    model = trained_model()
    prompt = torch.tensor([[3, 7, 1, 9]])
    _, stats = speculative_generate(model, prompt, 40, 3)
    assert stats.accept_length > 2.0  # a learnt pattern: most drafts pass
    rates = stats.depth_acceptance
    assert len(rates) == 3 and all(0 <= r <= 1 for r in rates)
    assert sum(stats.accept_lengths) >= 40 - 1  # every round emits accept_length tokens


def test_rejection_rule_keeps_the_target_distribution():
    """Chi-square: draft from q, accept/resample against p, the emitted token follows p (V = 5, seeded)."""
    g = torch.Generator().manual_seed(0)
    p = torch.tensor([0.40, 0.25, 0.20, 0.10, 0.05], dtype=torch.float64)
    q = torch.tensor([0.05, 0.10, 0.20, 0.25, 0.40], dtype=torch.float64)
    n = 20000
    counts = torch.zeros(5)
    for _ in range(n):
        d = int(torch.multinomial(q, 1, generator=g)[0])
        ok, repl = accept_or_resample(p, q, d, g)
        counts[d if ok else repl] += 1
    expected = p.float() * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 18.47  # the 0.999 quantile of chi-square with 4 degrees of freedom
    # and the naive rule (always keep the draft) is caught by the same test
    naive = torch.bincount(torch.multinomial(q, n, replacement=True, generator=g), minlength=5).float()
    assert float(((naive - expected) ** 2 / expected).sum()) > 1000


def test_first_speculative_token_follows_the_main_model_exactly():
    """Exact enumeration: the token at the first draft position, over the rule's randomness, is p_1."""
    model = trained_model()
    prompt = torch.tensor([[3, 7, 1, 9, 4]])
    temperature = 1.5
    counts = torch.zeros(CFG.vocab_size)
    first = None
    for seed in range(300):
        ids = speculative_generate(model, prompt, 2, 1, temperature=temperature, seed=seed)[0]
        if first is None or int(ids[0, 5]) == first:
            first = int(ids[0, 5])
            counts[int(ids[0, 6])] += 1
    with torch.no_grad():
        target = nucleus_probs(model(torch.cat([prompt, torch.tensor([[first]])], 1)).logits[:, -1], temperature, 1.0)[0]
    n = counts.sum()
    keep = target * n >= 5  # chi-square on the cells with enough expected mass
    expected = target[keep].float() * n
    observed = counts[keep]
    chi2 = float(((observed - expected) ** 2 / expected).sum()) + float(counts[~keep].sum())
    assert chi2 < 40


class WrongFromDepth(torch.nn.Module):
    """The model's MTP layer, except that every draft from depth ``depth`` on is wrong on purpose: its logits are
    negated, so it drafts the token the MTP layer finds least likely, never the main model's argmax (unless a row
    of logits is constant). Rejections are thus certain: every round accepts at most depth - 1 drafts.
    ``odd_rounds_from_1``: in every second round all drafts are wrong, so rounds that accept nothing happen too,
    whatever the trained layer gets right."""

    def __init__(self, mtp, depth: int, draft_steps: int, odd_rounds_from_1: bool = False):
        super().__init__()
        self.inner, self.depth, self.draft_steps, self.calls = mtp, depth, draft_steps, 0
        self.odd_rounds_from_1 = odd_rounds_from_1

    def step(self, *args, **kwargs):
        return self.inner.step(*args, **kwargs)

    def logits(self, h, lm_head):
        j = self.calls % self.draft_steps + 1  # speculative_generate asks depths 1 .. draft_steps in turn
        odd_round = (self.calls // self.draft_steps) % 2 == 1
        self.calls += 1
        z = self.inner.logits(h, lm_head)
        return -z if j >= (1 if odd_round and self.odd_rounds_from_1 else self.depth) else z


@pytest.mark.parametrize("wrong_from", [1, 2])
def test_cache_rollback_leaves_the_caches_of_a_plain_decode(wrong_from):
    model = copy.deepcopy(trained_model())
    model.mtp = WrongFromDepth(model.mtp, wrong_from, draft_steps=3, odd_rounds_from_1=wrong_from == 2)
    prompt = torch.tensor([[3, 7, 1, 9, 4]])  # the learnt pattern: depth-1 drafts are right there
    cache = model.new_cache(1, 5 + 24 + 4)
    ids, stats = speculative_generate(model, prompt, 24, draft_steps=3, cache=cache)
    assert torch.equal(ids, model.generate(prompt, 24))  # wrong drafts never change greedy output
    assert all(a <= wrong_from for a in stats.accept_lengths)  # a rejection in every round, by construction
    if wrong_from == 2:  # ... rounds that accepted a draft before rejecting one, and (made so in every second
        # round) rounds that accepted none: both rollbacks happen
        assert 2 in stats.accept_lengths and 1 in stats.accept_lengths, stats.accept_lengths
    L = ids.shape[1] - 1  # the last emitted token never enters the cache
    assert cache.length == L
    plain = model.new_cache(1, L)
    with torch.no_grad():
        model(ids[:, :L], cache=plain)
    # 1e-6, not 1e-12: RoPE and softmax run in fp32 inside the fp64 model; a wrong rollback is off by O(1)
    for ours, ref in zip(cache.layers, plain.layers):
        assert rel(ours.latent[:, :L], ref.latent[:, :L]) < 1e-6
        assert rel(ours.k_rope[:, :L], ref.k_rope[:, :L]) < 1e-6
        assert rel(ours.index_keys[:, :L], ref.index_keys[:, :L]) < 1e-6


def test_speculative_decoding_bad_input():
    model = trained_model()
    prompt = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="draft_steps"):
        speculative_generate(model, prompt, 4, -1)
    with pytest.raises(ValueError, match="one sequence"):
        speculative_generate(model, torch.tensor([[1, 2], [3, 4]]), 4, 2)
    no_mtp = GLM5ForCausalLM(dataclasses.replace(CFG, num_nextn_predict_layers=0))
    with pytest.raises(ValueError, match="no MTP layer"):
        speculative_generate(no_mtp, prompt, 4, 2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        speculative_generate(model, prompt, -1, 2)
    with pytest.raises(ValueError, match="temperature"):
        speculative_generate(model, prompt, 4, 2, temperature=-1.0)
    with pytest.warns(UserWarning, match="exceeds"):
        speculative_generate(model, prompt, 4, 5)


def test_mtp_layer_round_trips_through_the_checkpoint_layout(tmp_path):
    model = trained_model()
    model.save_pretrained(tmp_path / "c")
    loaded = GLM5ForCausalLM.from_pretrained(tmp_path / "c")
    for (n, a), (m, b) in zip(model.mtp.state_dict().items(), loaded.mtp.state_dict().items()):
        assert n == m and torch.equal(a.to(b.dtype), b)
    names = set(model.hf_state_dict())
    L = CFG.num_hidden_layers
    assert {f"model.layers.{L}.enorm.weight", f"model.layers.{L}.hnorm.weight", f"model.layers.{L}.eh_proj.weight",
            f"model.layers.{L}.shared_head.norm.weight", f"model.layers.{L}.mlp.gate.weight",
            f"model.layers.{L}.input_layernorm.weight"} <= names
    assert not any(n.startswith("mtp.") for n in names)
