"""glm5_ref.training.run: loss goes down, DSA stages train what they should, exact resume, safe interrupts, bad input."""

import dataclasses
import json

import pytest
import torch

from glm5_ref.training import checkpoint as ckpt
from glm5_ref.training import engine
from glm5_ref.training import run as tr
from glm5_ref.model import GLM5ForCausalLM
from glm5_ref.training.optim import build_optimizer

# tiny batches: a step of the tiny config takes ~20 ms on one core
RUN = dict(batch_size=2, seq_len=16, num_evals=2, eval_windows_n=2, progress=False, checkpoint_minutes=0)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def batch():
    from glm5_ref.training.data import build_splits

    return build_splits().train.ids[:2 * 33].reshape(2, 33)  # (B, T + 1)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GLM5ForCausalLM(tr.resolve_config("tiny"))


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch(batch):
    model = tiny_model()
    opt = build_optimizer(model, "adamw", 3e-3)
    engine.set_dsa_stage(model, "dense")
    losses = [engine.train_step(model, opt, batch)[1].item() for _ in range(8)]
    assert losses[-1] < losses[0] - 0.05, losses


def test_muon_split_steps_reduce_the_loss(batch):
    model = tiny_model()
    opt = build_optimizer(model, "muon_split", 0.01)
    losses = [engine.train_step(model, opt, batch)[1].item() for _ in range(6)]
    assert losses[-1] < losses[0], losses


def test_warmup_stage_trains_only_the_indexers(batch):
    model = tiny_model()
    opt = build_optimizer(model, "adamw", 1e-2)
    engine.set_dsa_stage(model, "warmup")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    biases = [b.clone() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
    out, loss, _ = engine.train_step(model, opt, batch, stage="warmup")
    assert torch.equal(loss, out.indexer_loss)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(".indexer." in n for n in changed), changed
    assert all(torch.equal(a, b) for a, b in zip(biases, (b for n, b in model.named_buffers()
                                                          if n.endswith("e_score_correction_bias"))))
    engine.set_dsa_stage(model, "sparse")
    assert model.execution.sparse and model.execution.detach_indexer_input
    assert all(p.requires_grad for p in model.parameters())
    out, loss, _ = engine.train_step(model, opt, batch, stage="sparse")
    assert out.indexer_loss is not None and torch.isfinite(loss)
    engine.set_dsa_stage(model, "dense")
    assert not (model.execution.sparse or model.execution.detach_indexer_input)


def test_dense_stage_updates_router_bias(batch):
    model = tiny_model()
    opt = build_optimizer(model, "adamw", 1e-3)
    bias = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert torch.count_nonzero(bias) == 0
    engine.train_step(model, opt, batch)
    assert torch.count_nonzero(bias) > 0


def test_schedules():
    assert engine.lr_factor(0.0, 0.1, 0.1) == 0.0
    assert engine.lr_factor(0.1, 0.1, 0.1) == pytest.approx(1.0)
    assert engine.lr_factor(1.0, 0.1, 0.1) == pytest.approx(0.1)
    assert engine.lr_factor(0.55, 0.1, 0.0) == pytest.approx(0.5)
    sched = tr.parse_dsa_schedule("dense:0.5,warmup:0.25,sparse:0.25")
    assert [tr.stage_at(sched, p) for p in (0, 0.49, 0.5, 0.8, 1.0)] == ["dense", "dense", "warmup", "sparse",
                                                                        "sparse"]
    assert tr.parse_dsa_schedule("sparse") == [("sparse", 1.0)]
    for bad in ("mixed", "dense:0.5", "dense:0.5,sparse:x", [("dense", 2.0)]):
        with pytest.raises(ValueError, match="dsa_stage"):
            tr.parse_dsa_schedule(bad)


def params_and_buffers(model):
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    kwargs = dict(steps=6, dsa_stage="dense:0.34,warmup:0.33,sparse:0.33", **RUN)
    straight = tr.train("tiny", tmp_path / "straight", **kwargs)

    def stop_at_3(step, record):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tr.train("tiny", tmp_path / "resumed", callback=stop_at_3, **kwargs)
    assert ckpt.read_trainer_state(tmp_path / "resumed")["step"] == 3
    assert not ckpt.read_trainer_state(tmp_path / "resumed")["finished"]
    resumed = tr.train("tiny", tmp_path / "resumed", resume=True, **kwargs)
    assert resumed.step == straight.step == 6 and resumed.stage == "sparse"
    a = params_and_buffers(GLM5ForCausalLM.from_pretrained(straight.checkpoint))
    b = params_and_buffers(GLM5ForCausalLM.from_pretrained(resumed.checkpoint))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    steps_a = [r["loss"] for r in straight.log if r["kind"] == "step"]
    steps_b = [r["loss"] for r in resumed.log if r["kind"] == "step"]
    assert steps_a == steps_b  # the log of the resumed run is whole, each step once
    assert straight.final_eval == resumed.final_eval
    opt_a = torch.load(tmp_path / "straight" / "checkpoint" / ckpt.STATE_FILE, weights_only=False)["optimizer"]
    opt_b = torch.load(tmp_path / "resumed" / "checkpoint" / ckpt.STATE_FILE, weights_only=False)["optimizer"]
    for name in opt_a:
        for key, s in opt_a[name]["state"].items():
            for k, v in s.items():
                assert torch.equal(v, opt_b[name]["state"][key][k])


def test_interrupt_during_a_save_leaves_the_last_checkpoint_loadable(tmp_path, monkeypatch):
    calls = {"n": 0}
    real_save = torch.save

    def flaky_save(obj, f, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] >= 2:  # the second save (step 4) is interrupted half-way, and so is the retry
            with open(f, "wb") as fh:
                fh.write(b"half a file")
            raise KeyboardInterrupt
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", flaky_save)
    with pytest.raises(KeyboardInterrupt):
        tr.train("tiny", tmp_path / "run", steps=6, checkpoint_every=2, **RUN)
    monkeypatch.setattr(torch, "save", real_save)
    info = ckpt.read_trainer_state(tmp_path / "run")
    assert info["step"] == 2 and not info["finished"]
    model = tr.load_model(tmp_path / "run")
    assert model(torch.tensor([[1, 2, 3]])).logits.isfinite().all()
    state = torch.load(ckpt.find_checkpoint(tmp_path / "run") / ckpt.STATE_FILE, weights_only=False)
    assert state["loop"]["step"] == 2
    # and the run continues from there
    result = tr.train("tiny", tmp_path / "run", steps=6, resume=True, **RUN)
    assert result.step == 6
    assert [r["step"] for r in result.log if r["kind"] == "step"] == list(range(1, 7))


def test_bad_input_raises_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="config name 'huge'"):
        tr.train("huge", tmp_path / "a", steps=1, **RUN)
    with pytest.raises(ValueError, match="minutes"):
        tr.train("tiny", tmp_path / "a", minutes=0, **RUN)
    with pytest.raises(ValueError, match="steps"):
        tr.train("tiny", tmp_path / "a", steps=-1, **RUN)
    with pytest.raises(ValueError, match="minutes.*steps|steps"):
        tr.train("tiny", tmp_path / "a", **RUN)
    with pytest.raises(ValueError, match="optimizer"):
        tr.train("tiny", tmp_path / "a", steps=1, optimizer="sgd", **RUN)
    for bad in (dict(repeat_fraction=1.5), dict(copy_probe=-1), dict(cpu_bf16="yes")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            tr.train("tiny", tmp_path / "a", steps=1, **bad, **RUN)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="not a checkpoint"):
        tr.load_model(tmp_path / "empty")
    tr.train("tiny", tmp_path / "done", steps=1, **RUN)
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        tr.train("tiny", tmp_path / "done", steps=1, **RUN)
    with pytest.raises(ValueError, match="different config"):
        tr.train(dataclasses.replace(tr.resolve_config("tiny"), num_hidden_layers=3), tmp_path / "done", steps=2,
                 resume=True, **RUN)


def test_copy_data_and_probe_and_cpu_bf16_resume_exactly(tmp_path):
    """A run with repeated spans, the copy probe at every evaluation and bf16 autocast on the CPU: the probe is in
    the log, and an interrupted run resumes to the same weights as an uninterrupted one."""
    opts = dict(RUN, repeat_fraction=0.5, copy_probe=4, cpu_bf16=True)
    whole = tr.train("tiny", tmp_path / "whole", steps=4, **opts)
    evals = [r for r in whole.log if r["kind"] == "eval"]
    assert evals and all(r["copy_first"] > 0 and r["copy_repeat"] > 0 for r in evals)
    def stop_at_2(step, record):
        if step == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tr.train("tiny", tmp_path / "split", steps=4, callback=stop_at_2, **opts)
    tr.train("tiny", tmp_path / "split", steps=4, resume=True, **opts)
    a, b = tr.load_model(tmp_path / "whole"), tr.load_model(tmp_path / "split")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    fp32 = tr.load_model(tr.train("tiny", tmp_path / "fp32", steps=4, **dict(opts, cpu_bf16=False)).checkpoint)
    assert not all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), fp32.state_dict().values()))


def test_log_and_trainer_state_are_readable(tmp_path):
    result = tr.train("tiny", tmp_path / "run", steps=3, **RUN)
    lines = (tmp_path / "run" / ckpt.LOG_FILE).read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["kind"] for r in records].count("step") == 3 and records[-1]["kind"] == "eval"
    assert records[0]["kind"] == "eval" and records[0]["step"] == 0  # the untrained model, where curves start
    assert {"loss", "lm_loss", "balance_loss", "lr", "grad_norm", "tok_s", "stage", "mtp_loss", "mtp_ce"} <= set(
        records[1])
    info = ckpt.read_trainer_state(tmp_path / "run")
    assert info["finished"] and info["attention"] == "dense" and info["step"] == 3
    assert info["last_eval"]["val_bpb"] == pytest.approx(result.final_eval["bpb"])


def test_compare_dense_script_quick(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "scripts" / "compare_dense.py"
    spec = importlib.util.spec_from_file_location("compare_dense", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    summary = module.run(quick=True, runs_dir=tmp_path / "runs", out_json=str(tmp_path / "c.json"),
                         out_png=str(tmp_path / "c.png"))
    assert (tmp_path / "c.json").is_file() and (tmp_path / "c.png").is_file()
    moe, dense = summary["runs"]["glm5_moe"], summary["runs"]["dense"]
    assert moe["tokens"] == dense["tokens"] and dense["first_k_dense_replace"] == 2
    assert dense["intermediate_size"] == 3 * 16  # (K + S) * d_e of the tiny config
    assert summary["equal_tokens"]["glm5_moe_bpb"] == moe["final_val_bpb"]
    assert module.interpolate([(0, 1.0), (10, 2.0)], 5) == 1.5


def test_matched_dense_config_has_the_active_ffn_parameters_of_an_moe_layer():
    config = tr.resolve_config("classroom")
    dense = tr.matched_dense_config(config)
    assert dense.num_moe_layers == 0
    moe_active = config.param_breakdown(active=True)
    per_layer_moe = (moe_active["routed_experts"] + moe_active["shared_experts"]) // config.num_moe_layers
    assert dense.param_breakdown()["dense_ffn"] == dense.num_hidden_layers * per_layer_moe
