"""Data-parallel training (glm5_ref/distributed/data_parallel.py) on 2 gloo processes: one DP step equals one
single-process step on the combined batch (AdamW and Muon, with and without expert parallelism), a DP run
interrupted and resumed ends where an uninterrupted one does, bad input fails on every rank, and the torchrun
command itself trains end to end.

As in test_distributed.py, process start-up dominates on a 2-core machine, so ONE 2-rank job (forked from a
server that imported torch and this module once) goes through every in-process case and returns tensors; the
single-process references are computed here."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time

import pytest
import torch

from glm5_ref.training import checkpoint as ckpt
from glm5_ref.training import engine
from glm5_ref.training import run as tr
from glm5_ref.distributed import launch
from glm5_ref.distributed.data_parallel import DataParallel
from glm5_ref.model import GLM5ForCausalLM
from glm5_ref.training.optim import build_optimizer
from tests.strategies import randn

START = dict(start_method="forkserver", preload=[__name__]) if sys.platform != "win32" else {}
WORLD = 2
B, T = 4, 17  # the global batch: (B, T + 1) tokens, B / 2 rows per rank
STEPS = 2
CASES = [  # (optimizer, expert parallel)
    ("adamw", False), ("muon", False), ("muon_split", True), ("adamw", True),
]
RUN = dict(steps=4, batch_size=4, seq_len=16, num_evals=1, eval_windows_n=2, progress=False, checkpoint_every=2,
           checkpoint_minutes=0, dsa_stage="dense:0.5,warmup:0.25,sparse:0.25", optimizer="muon_split", lr=0.01)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300)) if b.norm() > 0 else float(a.norm())


def batches(vocab: int) -> list[torch.Tensor]:
    return [(randn(50 + s, B, T + 1).abs() * 997).long() % vocab for s in range(STEPS)]


def fresh_model() -> GLM5ForCausalLM:
    torch.manual_seed(0)
    return GLM5ForCausalLM(tr.resolve_config("tiny"))


def single_process(optimizer: str) -> dict:
    model = fresh_model()
    opt = build_optimizer(model, optimizer, 0.01)
    norms = [engine.train_step(model, opt, batch)[2].item()  # MTP on (tiny has it): its MoE block is sharded too
             for batch in batches(model.config.vocab_size)]
    return {k: v.detach() for k, v in model.state_dict().items()}, norms


def adamw_updated(optimizer: str) -> set[str]:
    """Names of the parameters AdamW updates under ``optimizer`` (with "muon", still the embeddings, head, norms)."""
    model = fresh_model()
    opt = build_optimizer(model, optimizer, 0.01)
    ids = {id(p) for g in opt.optimizers["adamw"].param_groups for p in g["params"]}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def dp_steps(dp: DataParallel, optimizer: str) -> dict:
    model = fresh_model()
    dp.prepare(model)
    opt = dp.build_optimizer(model, optimizer, 0.01)
    losses, norms = [], []
    for batch in batches(model.config.vocab_size):
        out, loss, norm = engine.train_step(model, opt, batch, data_parallel=dp)
        losses.append(loss.item())
        norms.append(norm.item())
    full = dp.full_model(model)  # rank 0: every expert gathered; the others: None
    replicas = {k: v.detach().clone() for k, v in model.state_dict().items() if ".local_experts." not in k}
    return dict(full=None if full is None else {k: v.detach() for k, v in full.state_dict().items()},
                replicas=replicas, losses=losses, grad_norms=norms, names=sorted(opt.optimizers))


def errors(fn) -> str:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return ""


def dp_worker(rank: int, world: int, tmp: str) -> dict:
    dps = {False: DataParallel(), True: DataParallel(expert_parallel=True)}
    steps = [dp_steps(dps[ep], name) for name, ep in CASES]

    # an interrupted and resumed run (EP + Muon Split, through the dense, warm-up and sparse stages)
    straight = tr.train("tiny", os.path.join(tmp, "straight"), data_parallel=dps[True], **RUN)

    def stop_at_3(step, record):
        if step == 3:
            raise KeyboardInterrupt

    try:
        tr.train("tiny", os.path.join(tmp, "resumed"), data_parallel=dps[True], callback=stop_at_3, **RUN)
    except KeyboardInterrupt:
        pass
    step_at_resume = ckpt.read_trainer_state(os.path.join(tmp, "resumed"))["step"]
    resumed = tr.train("tiny", os.path.join(tmp, "resumed"), data_parallel=dps[True], resume=True, **RUN)

    # bad input: the same clear error on every rank, before any step
    quick = dict(steps=1, batch_size=4, seq_len=8, progress=False, eval_windows_n=2)
    t0 = time.monotonic()
    bad = dict(
        experts=errors(lambda: tr.train(dataclasses.replace(tr.resolve_config("tiny"), n_routed_experts=9),
                                        os.path.join(tmp, "bad1"), data_parallel=dps[True], **quick)),
        lr=errors(lambda: tr.train("tiny", os.path.join(tmp, "bad2"), data_parallel=dps[False],
                                   **(quick | dict(lr=1e-3 * (1 + rank))))),
        config=errors(lambda: tr.train(dataclasses.replace(tr.resolve_config("tiny"), hidden_size=32 + 16 * rank),
                                       os.path.join(tmp, "bad3"), data_parallel=dps[False], **quick)),
        batch=errors(lambda: tr.train("tiny", os.path.join(tmp, "bad4"), data_parallel=dps[False],
                                      **(quick | dict(batch_size=3)))),
    )
    bad_s = time.monotonic() - t0
    return dict(rank=rank, steps=steps, straight=straight, resumed=resumed, step_at_resume=step_at_resume,
                bad=bad, bad_s=bad_s)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dp")
    results = launch(dp_worker, WORLD, str(tmp), timeout=120, **START)
    assert [r["rank"] for r in results] == list(range(WORLD))
    return dict(results=results, tmp=tmp)


@pytest.mark.parametrize("k", range(len(CASES)), ids=[f"{o}{' + EP' if ep else ''}" for o, ep in CASES])
def test_dp_steps_equal_single_process_steps_on_the_combined_batch(job, k):
    optimizer, ep = CASES[k]
    ref, ref_norms = single_process(optimizer)
    ranks = [r["steps"][k] for r in job["results"]]
    full = ranks[0]["full"]
    assert full.keys() == ref.keys()
    by_adamw = adamw_updated(optimizer)
    assert "model.embed_tokens.weight" in by_adamw
    for name, t in ref.items():
        # AdamW divides by sqrt(v) + eps: entries whose gradient is near 0 amplify the rounding of the
        # all-reduced sum (2e-5 measured; 1.2e-5 on the embeddings of a "muon" run, which AdamW also updates);
        # Muon's orthogonalization does not (2e-6). The bias moves by +-gamma.
        tol = 0 if name.endswith("e_score_correction_bias") else 1e-4 if name in by_adamw else 1e-5
        assert rel(full[name], t) <= tol, f"{name} after {STEPS} steps ({optimizer}, ep={ep})"
    # AdamW and Muon are blind to a gradient's scale: the norms catch a wrong 1/W (e.g. on the experts)
    for a, b in zip(ranks[0]["grad_norms"], ref_norms):
        assert abs(a - b) <= 1e-5 * b, (ranks[0]["grad_norms"], ref_norms)
    for r in ranks[1:]:  # every rank holds the same replicated parameters
        for name, t in r["replicas"].items():
            assert torch.equal(t, ranks[0]["replicas"][name]), name
        assert r["losses"] == ranks[0]["losses"] and r["grad_norms"] == ranks[0]["grad_norms"]
        assert r["full"] is None
    assert ("muon_experts" in ranks[0]["names"]) == (ep and optimizer != "adamw")


def test_dp_resume_ends_where_an_uninterrupted_run_does(job):
    r0 = job["results"][0]
    assert r0["step_at_resume"] == 2  # an interrupt under DP does not save: the periodic checkpoint stands
    straight, resumed = r0["straight"], r0["resumed"]
    assert straight.step == resumed.step == 4 and resumed.stage == "sparse"
    a = GLM5ForCausalLM.from_pretrained(straight.checkpoint).state_dict()
    b = GLM5ForCausalLM.from_pretrained(resumed.checkpoint).state_dict()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps_a = [r["loss"] for r in ckpt.read_log(job["tmp"] / "straight") if r["kind"] == "step"]
    steps_b = [r["loss"] for r in ckpt.read_log(job["tmp"] / "resumed") if r["kind"] == "step"]
    assert len(steps_a) == 4 and steps_a == steps_b
    assert straight.final_eval == resumed.final_eval == job["results"][1]["straight"].final_eval
    state = torch.load(job["tmp"] / "resumed" / "checkpoint" / ckpt.STATE_FILE, weights_only=False)
    assert state["world_size"] == WORLD and state["expert_parallel"] and len(state["optimizer"]) == WORLD
    with pytest.raises(ValueError, match="2 data-parallel processes"):  # one process cannot resume it
        tr.train("tiny", job["tmp"] / "resumed", resume=True, **(RUN | dict(steps=5)))


def test_bad_input_fails_on_every_rank_fast(job):
    for r in job["results"]:
        bad = r["bad"]
        assert "n_routed_experts = 9 is not divisible by the world size 2" in bad["experts"], bad
        assert "rank 1 was given run" in bad["lr"] and "'lr': 0.002" in bad["lr"], bad
        assert "rank 1 was given config" in bad["config"] and "'hidden_size': 48" in bad["config"], bad
        assert "batch of 3 sequences is not divisible by the world size 2" in bad["batch"], bad
        assert r["bad_s"] < 30


def test_torchrun_trains_end_to_end(tmp_path):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    cmd = [torchrun, "--standalone", "--nproc_per_node", "2",  # --standalone: a free port, never a clash
           "-m", "glm5_ref", "train", "--config", "tiny", "--steps", "2",
           "--out", str(tmp_path / "run"), "--batch-size", "2", "--seq-len", "16", "--no-progress",
           "--expert-parallel", "--optimizer", "muon"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("trained 2 steps") == 1  # rank 0 alone reports
    log = ckpt.read_log(tmp_path / "run")
    assert [r["step"] for r in log if r["kind"] == "step"] == [1, 2]
    assert ckpt.read_trainer_state(tmp_path / "run")["finished"]
    model = tr.load_model(tmp_path / "run")  # the full checkpoint, every expert, loads in one process
    assert len(model.model.layers[-1].mlp.experts) == model.config.n_routed_experts


def test_expert_parallel_needs_torchrun(tmp_path, capsys):
    from glm5_ref.__main__ import main

    assert main(["train", "--config", "tiny", "--steps", "1", "--out", str(tmp_path), "--expert-parallel"]) == 2
    assert "launch with torchrun" in capsys.readouterr().err
    with pytest.raises(RuntimeError, match="not initialised"):
        DataParallel()
