"""`python -m glm5_ref post-train [--quick] [--from CKPT] [--out DIR] [--resume]`: GLM-5's post-training (report
section 3, Figure 5) at classroom scale, end to end, on the training engine.

    stage             starts from        what                                              full run (2 cores), est.
    01_sft            the base           SFT: three families x three thinking modes        700 steps x 3K tokens, ~21 min
    02_reward_models  the SFT model      ORM (Bradley-Terry, 120 steps) + GRM (score SFT,  ~5 min
                                         160 steps); evaluates the base and SFT rows
    03_reasoning_rl   the SFT model      GRPO + IcePop, G = 8, P = 8, binary rewards       60 steps, ~7 min
    04_agentic_rl     reasoning RL       the asynchronous loop, G = 4, 2 groups/update     40 updates, ~7 min
    05_general_rl     agentic RL         hybrid reward, G = 4, P = 8; plus 15-step runs    40 + 5 x 15 steps, ~10 min
                                         with each reward alone / both hybrids
    06_distill        general RL         on-policy cross-stage distillation, G = 1         30 steps, ~6 min
    07_context        the final model    none / keep-recent-k / hierarchical, long tasks   12 episodes each, ~3 min
    then              figures/post_training.json and .png; the chat model shipped to
                      glm5_ref/assets/checkpoints/classroom-chat/ (ship.py)
Every policy stage ends with its row of the evaluation matrix (evaluate.py, ~1-1.5 min each, included above).
Estimated total on an idle 2-core machine: about 60-70 minutes (the budget is 90); result.json of each stage and
the document's "timing_s" record the real wall times.

Resumable per stage: each stage writes OUT/<nn>_<name>.tmp/ and renames it to OUT/<nn>_<name>/ when it is complete
(its result.json records the sha256 of every weight file); ``--resume`` skips the complete stages (after checking
those hashes: a truncated or altered file is an error, never loaded), deletes a half-written .tmp folder and
reruns the stage that was interrupted from its starting checkpoint. Without ``--resume`` an OUT that already holds
stages is an error. ``--quick``: the same stages on the tiny config (positions widened to 2,048 for the agent
window), a few steps each, small evaluation sets, into runs/post-train-quick/ (figures and the shipped copy too):
under a minute, for CI. ``--from CKPT``: the base (a shipped folder with metrics.json, or a training checkpoint);
default: the shipped classroom-base (quick: a fresh tiny model).
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from glm5_ref.model import GLM5ForCausalLM
from glm5_ref.apps.post_train.agentic_rl import AgenticRLConfig, run_agentic_rl
from glm5_ref.apps.post_train.context import measure_context_management
from glm5_ref.apps.post_train.distill import DistillConfig, run_distill
from glm5_ref.apps.post_train.evaluate import EvalConfig, eval_sets, evaluate_policy
from glm5_ref.apps.post_train.general_rl import compare_rewards, general_config, run_general_rl
from glm5_ref.apps.post_train.reasoning_rl import GRPOConfig, run_reasoning_rl
from glm5_ref.apps.post_train.rewards import OutcomeRM, train_grm, train_orm
from glm5_ref.apps.post_train.sft import SFTConfig, run_sft

DEFAULT_OUT = Path("runs") / "post-train"
POLICY_STAGES = ("base", "sft", "reasoning_rl", "agentic_rl", "general_rl", "distill")
STAGES = ("sft", "reward_models", "reasoning_rl", "agentic_rl", "general_rl", "distill", "context")


@dataclass
class PostTrainConfig:
    sft: SFTConfig = field(default_factory=SFTConfig)
    orm_steps: int = 120
    grm_steps: int = 160
    reasoning: GRPOConfig = field(default_factory=GRPOConfig)
    agentic: AgenticRLConfig = field(default_factory=AgenticRLConfig)
    general: GRPOConfig = field(default_factory=general_config)
    compare_steps: int = 15       # each reward alone / both hybrids, from the agentic-RL model
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cm_episodes: int = 12
    seed: int = 0
    quick: bool = False


def quick_config() -> PostTrainConfig:
    return PostTrainConfig(
        sft=SFTConfig(steps=4, tokens_per_step=1024), orm_steps=2, grm_steps=2,
        reasoning=GRPOConfig(steps=2, prompts_per_step=2, group_size=2, max_new_tokens=8, rl_set=16),
        agentic=AgenticRLConfig(num_updates=2, group_size=2, groups_per_update=1, max_new_tokens=8, rl_set=16),
        general=general_config(steps=2, prompts_per_step=2, group_size=2, max_new_tokens=6, rl_set=16),
        compare_steps=1, distill=DistillConfig(steps=2, per_family=1, rl_set=16,
                                               max_new_tokens={"reasoning": 8, "agentic": 8, "general": 6}),
        eval=EvalConfig(reasoning=4, agentic=2, general=4, reasoning_sampled=2, reasoning_tokens=8, agentic_tokens=8,
                        general_tokens=6),
        cm_episodes=1, quick=True)


def quick_base(seed: int = 0) -> GLM5ForCausalLM:
    """The tiny config widened to the tokenizer, with positions for the agent window (context.WINDOW)."""
    from glm5_ref.training.options import resolve_config

    torch.manual_seed(seed)
    return GLM5ForCausalLM(dataclasses.replace(resolve_config("tiny"), max_position_embeddings=2048)).eval()


def load_base(path) -> GLM5ForCausalLM:
    from glm5_ref.pretrained import load_pretrained
    from glm5_ref.training.run import load_model

    if path is None:
        return load_pretrained("classroom-base")[0]
    path = Path(path)
    if (path / "metrics.json").is_file():
        return load_pretrained(directory=path)[0]
    return load_model(path)


# ---- stage folders ----------------------------------------------------------------------------------------------
def _digest(folder: Path) -> dict[str, str]:
    """sha256 of every file of a stage folder but its result.json (weights, configs, the ORM head)."""
    return {os.fspath(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != "result.json"}


class StageDir:
    """OUT/<nn>_<name>/: written complete or not at all (module docstring)."""

    def __init__(self, out: Path, name: str):
        self.final = out / f"{STAGES.index(name) + 1:02d}_{name}"
        self.tmp = self.final.with_name(self.final.name + ".tmp")

    def done(self) -> bool:
        return (self.final / "result.json").is_file()

    def result(self) -> dict:
        res = json.loads((self.final / "result.json").read_text())
        if _digest(self.final) != res["weights_sha256"]:
            raise ValueError(f"{os.fspath(self.final)}: its files do not match the sha256 in result.json "
                             f"(truncated or altered); delete the folder and rerun with --resume")
        return res

    def begin(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def commit(self, result: dict) -> dict:
        result = {**result, "weights_sha256": _digest(self.tmp)}
        (self.tmp / "result.json").write_text(json.dumps(result, indent=1, default=str) + "\n")
        os.replace(self.tmp, self.final)
        return result


def load_policy(folder: Path, sparse: bool) -> GLM5ForCausalLM:
    model = GLM5ForCausalLM.from_pretrained(folder)
    model.set_execution(sparse=sparse)
    return model.eval()


def _progress(name: str, total: int, quick: bool):
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc=name, disable=quick, leave=True)

    def update(step, record):
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in record.items() if isinstance(v, float) and k in
                         ("loss", "reward", "frac_popped", "reverse_kl", "agentic_reward")}, refresh=False)
        if step + 1 >= total:
            bar.close()
    return update


# ---- the pipeline ----------------------------------------------------------------------------------------------
def run_post_training(quick: bool = False, from_ckpt=None, out_dir=None, resume: bool = False,
                      figures_dir=None, ship_dest=None, cfg: PostTrainConfig | None = None) -> dict:
    """Every stage (module docstring); returns the results document (post_training.json)."""
    from glm5_ref.apps.post_train.report import goals, write_figure
    from glm5_ref.apps.post_train.ship import ship_chat_model

    cfg = cfg or (quick_config() if quick else PostTrainConfig())
    out = Path(out_dir) if out_dir is not None else DEFAULT_OUT.with_name("post-train-quick" if quick else "post-train")
    stages = {n: StageDir(out, n) for n in STAGES}
    if not resume and any(s.done() or s.tmp.exists() for s in stages.values()):
        raise ValueError(f"{os.fspath(out)} already holds post-training stages; pass --resume to continue them, or "
                         f"choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    base = quick_base(cfg.seed) if quick and from_ckpt is None else load_base(from_ckpt)
    sparse = base.execution.sparse
    evals, timing, results = {}, {}, {}
    ecfg = cfg.eval
    sets = eval_sets(ecfg)

    def run_stage(name, body):
        sd = stages[name]
        if sd.done():
            results[name] = sd.result()
            print(f"[post-train] {name}: done earlier, reusing {os.fspath(sd.final)}")
        else:
            t0 = time.perf_counter()
            res = body(sd.begin())
            res["wall_s"] = time.perf_counter() - t0
            results[name] = sd.commit(res)
            torch.set_num_threads(threads)  # the async loop sets 1 thread for its trainer thread
            print(f"[post-train] {name}: {res['wall_s']:.0f} s")
        timing[name] = results[name]["wall_s"]
        evals.update(results[name].get("eval", {}))
        return sd.final

    def sft(tmp):
        model = copy.deepcopy(base)
        hist = run_sft(model, cfg.sft, _progress("sft", cfg.sft.steps, quick))
        model.save_pretrained(tmp / "model")
        return {"history": hist}

    sft_dir = run_stage("sft", sft)

    def reward_models(tmp):
        sft_model = load_policy(sft_dir / "model", sparse)
        orm, orm_loss = train_orm(copy.deepcopy(sft_model), cfg.orm_steps, seed=cfg.seed)
        grm = copy.deepcopy(sft_model)
        grm_loss = train_grm(grm, cfg.grm_steps, seed=cfg.seed)
        orm.lm.save_pretrained(tmp / "orm")
        torch.save({"norm": orm.norm.state_dict(), "head": orm.head.state_dict()}, tmp / "orm" / "head.pt")
        grm.save_pretrained(tmp / "grm")
        return {"orm_loss": orm_loss, "grm_loss": grm_loss,
                "eval": {"base": evaluate_policy(base, grm, ecfg, sets), "sft": evaluate_policy(sft_model, grm, ecfg, sets)}}

    rm_dir = run_stage("reward_models", reward_models)
    grm = load_policy(rm_dir / "grm", sparse)
    orm = OutcomeRM(load_policy(rm_dir / "orm", sparse))
    head = torch.load(rm_dir / "orm" / "head.pt")
    orm.norm.load_state_dict(head["norm"])
    orm.head.load_state_dict(head["head"])
    orm.eval()

    def policy_stage(name, start_dir, train):
        def body(tmp):
            model = load_policy(start_dir / "model", sparse)
            extra = train(model)
            model.save_pretrained(tmp / "model")
            return {**extra, "eval": {name: evaluate_policy(model, grm, ecfg, sets)}}
        return run_stage(name, body)

    r_dir = policy_stage("reasoning_rl", sft_dir, lambda m: {"history": run_reasoning_rl(
        m, cfg.reasoning, _progress("reasoning RL", cfg.reasoning.steps, quick))})
    a_dir = policy_stage("agentic_rl", r_dir, lambda m: run_agentic_rl(
        m, cfg.agentic, _progress("agentic RL", cfg.agentic.num_updates, quick)))

    def general(model):
        start = copy.deepcopy(model)
        main = run_general_rl(model, orm, grm, cfg.general, "hybrid", _progress("general RL", cfg.general.steps, quick))
        short = dataclasses.replace(cfg.general, steps=cfg.compare_steps)
        comp = compare_rewards(start, orm, grm, short, sets["general"])
        return {**main, "compare": comp}

    g_dir = policy_stage("general_rl", a_dir, general)

    def distill(model):
        teachers = {"reasoning": load_policy(r_dir / "model", sparse), "agentic": load_policy(a_dir / "model", sparse),
                    "general": load_policy(g_dir / "model", sparse)}
        return {"history": run_distill(model, teachers, cfg.distill, _progress("distill", cfg.distill.steps, quick))}

    d_dir = policy_stage("distill", g_dir, distill)

    def context(tmp):
        final = load_policy(d_dir / "model", sparse)
        return {"context_management": measure_context_management(final, cfg.cm_episodes,
                                                                   max_new_tokens=8 if quick else 80)}

    run_stage("context", context)
    cm = results["context"]["context_management"]
    doc = {"stages": list(POLICY_STAGES), "eval": {s: evals[s] for s in POLICY_STAGES},
           "context_management": {k: v["success"] for k, v in cm["strategies"].items()},
           "context_management_details": cm, "seeds": [cfg.seed],
           "general_rl_rewards": results["general_rl"]["compare"], "timing_s": timing,
           "config": dataclasses.asdict(cfg), "quick": quick}
    doc["goals"] = goals(doc)
    dest = Path(ship_dest) if ship_dest is not None else (out / "classroom-chat" if quick else None)
    doc["shipped"] = os.fspath(ship_chat_model(load_policy(d_dir / "model", sparse), doc, dest))
    figures = Path(figures_dir) if figures_dir is not None else (out if quick else Path("figures"))
    write_figure(doc, figures / "post_training")
    return doc
