"""glm5_ref.training.synthetic: repeated spans in the batches (where, how often, exact resume) and the copy probe
(a model that copies scores low on the repeat, one that cannot does not)."""

import pytest
import torch

from glm5_ref.training.data import BatchSampler
from glm5_ref.training.synthetic import RandomCopySampler, RepeatMixSampler, copy_probe, probe_windows


def stream(n=5000, seed=0):
    return torch.randint(0, 4000, (n,), generator=torch.Generator().manual_seed(seed))


def spans_of(row: torch.Tensor, ids: torch.Tensor, min_span: int):
    """(first, second, L) of a span of ``ids`` that ``row`` holds twice (the longest found), else None."""
    W = row.numel()
    for L in range(W // 2, min_span - 1, -1):
        seen = {}
        for a in range(W - L + 1):
            key = tuple(row[a:a + L].tolist())
            if key in seen and a >= seen[key] + L:
                return seen[key], a, L
            seen.setdefault(key, a)
    return None


def test_rows_hold_a_span_twice_at_the_expected_rate_and_the_rest_is_the_stream():
    ids = stream()
    plain = BatchSampler(ids, 64, 63, seed=3)
    mixed = RepeatMixSampler(ids, 64, 63, seed=3, fraction=0.5, min_span=8)
    a, b = plain.next(), mixed.next()  # the same generator: the same windows before the spans go in
    changed = (a != b).any(dim=1)
    assert 16 <= int(changed.sum()) <= 48  # about half of 64 rows (a binomial draw, p = 0.5)
    assert torch.equal(a[~changed], b[~changed])
    for row in b[changed]:
        found = spans_of(row, ids, 8)
        assert found is not None, row
        first, second, L = found
        assert 8 <= L <= 32 and second >= first + L


def test_fraction_zero_is_the_plain_sampler_and_one_changes_every_row():
    ids = stream()
    assert torch.equal(BatchSampler(ids, 8, 63, seed=1).next(), RepeatMixSampler(ids, 8, 63, seed=1, fraction=0).next())
    a, b = BatchSampler(ids, 32, 63, seed=1).next(), RepeatMixSampler(ids, 32, 63, seed=1, fraction=1.0).next()
    assert int((a != b).any(dim=1).sum()) >= 30  # a span can land on text equal to itself only by chance


def test_resume_draws_exactly_the_same_batches():
    ids = stream()
    s = RepeatMixSampler(ids, 4, 31, seed=5, fraction=0.5, min_span=4)
    s.next(), s.next()
    state = s.state_dict()
    expected = [s.next() for _ in range(3)]
    t = RepeatMixSampler(ids, 4, 31, seed=99, fraction=0.5, min_span=4)
    t.load_state_dict(state)
    assert all(torch.equal(x, t.next()) for x in expected)


@pytest.mark.parametrize("kwargs, match", [(dict(fraction=1.5), "fraction"), (dict(fraction=True), "fraction"),
                                           (dict(min_span=0), "min_span"), (dict(min_span=17), "min_span")])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RepeatMixSampler(stream(), 2, 31, **kwargs)


class Copier(torch.nn.Module):
    """A perfect induction head by hand: predicts the token that followed the previous occurrence of the current
    token (uniform when there is none)."""

    def __init__(self, vocab=4000):
        super().__init__()
        self.vocab = vocab
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, ids):
        B, T = ids.shape
        logits = torch.zeros(B, T, self.vocab)
        for b in range(B):
            last = {}
            for t in range(T):
                tok = int(ids[b, t])
                if tok in last and last[tok] + 1 < T:
                    logits[b, t, ids[b, last[tok] + 1]] = 30.0
                last[tok] = t
        return type("Out", (), {"logits": logits})()


class Uniform(Copier):
    def forward(self, ids):
        return type("Out", (), {"logits": torch.zeros(*ids.shape, self.vocab)})()


def test_copy_probe_separates_a_copier_from_a_model_that_cannot_copy():
    ids = torch.randperm(4000)  # distinct tokens: the previous occurrence is always the span's first copy
    windows = probe_windows(ids, n=4, span=24)
    assert windows.shape == (4, 48) and torch.equal(windows[:, :24], windows[:, 24:])
    copier, uniform = copy_probe(Copier(), ids, n=4, span=24), copy_probe(Uniform(), ids, n=4, span=24)
    assert copier["repeat"] < 1e-6 and copier["first"] == pytest.approx(8.294, abs=1e-3)  # ln 4000
    assert uniform["repeat"] == pytest.approx(uniform["first"]) == pytest.approx(8.294, abs=1e-3)


def test_random_copy_rows_are_a_random_span_twice_and_resume_exactly():
    s = RandomCopySampler(4, 15, seed=2, vocab=50)
    b = s.next()
    assert b.shape == (4, 16) and torch.equal(b[:, :8], b[:, 8:]) and int(b.max()) < 50
    assert len({tuple(r.tolist()) for r in b}) == 4  # every row its own span
    state = s.state_dict()
    expected = s.next()
    t = RandomCopySampler(4, 15, seed=0, vocab=50)
    t.load_state_dict(state)
    assert torch.equal(t.next(), expected)
    odd = RandomCopySampler(2, 16, seed=0).next()  # 17 tokens: a 9-token span, then its first 8 again
    assert odd.shape == (2, 17) and torch.equal(odd[:, :8], odd[:, 9:]) and int(odd.max()) < 4088


def test_a_run_on_the_copy_task_trains_and_logs_the_probe(tmp_path):
    from glm5_ref.training.run import train

    result = train("tiny", tmp_path / "copy", steps=3, batch_size=2, seq_len=15, num_evals=1, eval_windows_n=2,
                   progress=False, checkpoint_minutes=0, random_copy=True, copy_probe=2)
    assert result.step == 3 and all(r["copy_repeat"] > 0 for r in result.log if r["kind"] == "eval")
