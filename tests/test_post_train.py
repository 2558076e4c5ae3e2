"""GLM-5's post-training at classroom scale (glm5_ref/apps/post_train/, the chat part of glm5_ref/tito.py): TITO
samples per user turn (interleaved) or appended (preserved), the tasks and their verifiers, the tools, context
management, the eq. 1 / eq. 2 update, the reward models, and the quick pipeline end to end with resume."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from glm5_ref.chat import render
from glm5_ref.tito import ChatConversation, TITOGateway
from glm5_ref.tokenizer import SPECIAL_TOKENS
from glm5_ref.apps.post_train import context as cm
from glm5_ref.apps.post_train.rl_core import Sample, eq1_update, rl_trainer, token_logprobs
from glm5_ref.apps.post_train.rollout import answer_turns, run_episodes
from glm5_ref.apps.post_train.tasks import (fixed_set, general_example, in_eval_split, instruction_pass,
                                            reasoning_example, reasoning_reward, rule_reward)
from glm5_ref.apps.post_train.tools import agentic_example, agentic_reward, calc, execute

EOT, USER, OBS = (SPECIAL_TOKENS[t] for t in ("<|endoftext|>", "<|user|>", "<|observation|>"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class Oracle(torch.nn.Module):
    """A stand-in policy that plays each example's demonstration: it finds the question in the context, counts the
    assistant turns since it, and emits that turn's canonical ids and the turn's stop token (log-prob -0.1 each)."""

    def __init__(self, examples, final_stop=EOT):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = type("C", (), {"max_position_embeddings": 4096})()
        self.turns = {}
        for ex in examples:
            seq, turns = ex.messages + ex.demo, []
            for i, m in enumerate(seq):
                if m["role"] == "assistant" and i >= len(ex.messages):
                    before = render(seq[:i], ex.tools, add_generation_prompt=True, enable_thinking=ex.enable_thinking)
                    full = render(seq[:i + 1], ex.tools)
                    nxt = seq[i + 1]["role"] if i + 1 < len(seq) else None
                    turns.append(full.ids[len(before.ids):] + [OBS if nxt == "tool" else USER if nxt else final_stop])
            self.turns[tuple(render(ex.messages[-1:]).ids[2:])] = turns  # keyed by the user message's ids

    def _turn(self, context):
        user = max(i for i, t in enumerate(context) if t == USER)
        for key, turns in self.turns.items():
            if tuple(context[user:user + len(key)]) == key:
                k = sum(1 for t in context[user:] if t == SPECIAL_TOKENS["<|assistant|>"]) - 1
                return turns[min(k, len(turns) - 1)]
        raise AssertionError("unknown question")

    def generate(self, x, max_new_tokens, temperature=0.0, top_p=1.0, stop_tokens=None, seed=None,
                 return_logprobs=False, **kw):
        rows = [self._turn(r.tolist())[:max_new_tokens] for r in x]
        new = [r + [r[-1]] * (max_new_tokens - len(r)) for r in rows]
        out = torch.cat([x, torch.tensor(new, dtype=torch.long)], 1)
        return (out, torch.full((x.shape[0], max_new_tokens), -0.1)) if return_logprobs else out


# ---- TITO over the chat template ----------------------------------------------------------------------------
TWO_TURNS = [reasoning_example(random.Random(s)) for s in (1, 2)]


def _play(clear_thinking: bool, final_stop=EOT):
    """Two user turns (a reasoning question each) through one ChatConversation with the oracle."""
    model = Oracle(TWO_TURNS, final_stop=USER)
    gw = TITOGateway()
    conv = ChatConversation(gw, "c", TWO_TURNS[0].messages, clear_thinking=clear_thinking)
    conv.generate(model, 0, 64)
    conv.user(TWO_TURNS[1].question)
    model.turns = Oracle(TWO_TURNS, final_stop=final_stop).turns
    conv.generate(model, 1, 64)
    return conv, conv.finish(reward=1.0)


def test_interleaved_rendering_starts_a_new_sample_per_user_turn():
    conv, samples = _play(clear_thinking=True)
    assert [s.rollout_id for s in samples] == ["c/0", "c/1"] and not gw_live(conv)
    msgs = conv.messages
    first = render(msgs[:2], for_training=True)
    assert samples[0].ids[:-1] == first.ids[:-1] and samples[0].ids[-1] == USER  # it stopped with <|user|>
    second = render(msgs, for_training=True)  # the re-rendered history: the first reasoning is gone
    assert samples[1].ids == second.ids and TWO_TURNS[0].demo[0]["reasoning_content"] not in render(msgs).text
    last_user = max(i for i, t in enumerate(second.ids) if t == USER)
    assert samples[1].loss_mask == [int(m and i > last_user) for i, m in enumerate(second.train_mask)]
    assert all(s.reward == 1.0 for s in samples) and samples[1].model_versions == [1]


def test_preserved_rendering_appends_to_one_sample_that_equals_the_sft_rendering():
    conv, samples = _play(clear_thinking=False)
    assert len(samples) == 1
    full = render(conv.messages, for_training=True, clear_thinking=False)
    assert samples[0].ids == full.ids  # the model's <|user|> stop was not appended twice
    assert samples[0].loss_mask == [int(m) for m in full.train_mask]  # TITO's mask is the SFT mask
    assert samples[0].model_versions == [0, 1]


def test_preserved_keeps_an_eot_stop_and_interleaved_cannot_append_a_user_turn():
    model = Oracle(TWO_TURNS, final_stop=EOT)
    conv = ChatConversation(TITOGateway(), "e", TWO_TURNS[0].messages, clear_thinking=False)
    conv.generate(model, 0, 64)
    conv.user(TWO_TURNS[1].question)
    ids = conv.context()
    assert ids[ids.index(EOT) + 1] == USER  # the sampled <|endoftext|> stays, the template's delta follows
    inter = ChatConversation(TITOGateway(), "i", TWO_TURNS[0].messages)
    inter.generate(model, 0, 64)
    with pytest.raises(ValueError, match="not append-only"):  # why user() starts a new sample in this mode
        inter._append([{"role": "user", "content": "again"}])
    with pytest.raises(ValueError, match="ending with a user message"):
        ChatConversation(TITOGateway(), "x", [])


def gw_live(conv):
    return conv.gateway.live()


def test_a_tool_chain_is_one_sample_with_observations_masked():
    ex = agentic_example(random.Random(3), n_items=2)
    res = run_episodes(Oracle([ex]), [ex], execute, agentic_reward, temperature=0.0)[0]
    assert res["reward"] == 1.0 and len(res["samples"]) == 1 and res["turns"] == 4
    full = render(ex.messages + ex.demo, ex.tools, for_training=True)
    s = res["samples"][0]
    assert s.ids == full.ids and s.loss_mask == [int(m) for m in full.train_mask]


# ---- tasks, verifiers, tools ------------------------------------------------------------------------------------
def test_every_demonstration_passes_its_verifier_and_the_splits_are_disjoint():
    rng = random.Random(0)
    for _ in range(50):
        ex = reasoning_example(rng)
        assert reasoning_reward(ex, ex.demo[-1]) == 1.0
        g = general_example(rng, anchored=True)
        assert instruction_pass(g, g.demo[-1]) and rule_reward(g, g.demo[-1]) == 1.0
    assert rule_reward(g, {"content": "no"}) < 1.0
    train = {e.info["key"] for e in fixed_set(reasoning_example, 200, "train", 1)}
    held = {e.info["key"] for e in fixed_set(reasoning_example, 60, "eval", 1)}
    assert not train & held and all(in_eval_split(k) for k in held)
    assert [e.info["key"] for e in fixed_set(general_example, 5, "eval", 3)] == \
        [e.info["key"] for e in fixed_set(general_example, 5, "eval", 3)]  # seeded


def test_the_oracle_solves_every_agentic_episode_and_a_wrong_answer_fails():
    exs = fixed_set(agentic_example, 6, "eval", 5)
    res = run_episodes(Oracle(exs), exs, execute, agentic_reward, temperature=0.0)
    assert all(r["reward"] == 1.0 for r in res)
    assert agentic_reward(exs[0], {"content": "0", "tool_calls": []}) == 0.0


def test_calc_is_a_parser_not_eval():
    assert [calc(e) for e in ("23+41", "2*3+4", "10-3*2", "7")] == ["64", "10", "4", "7"]
    for bad in ("__import__('os')", "1/0", "", "2**8", "1+"):
        assert calc(bad).startswith("error")
    ex = agentic_example(random.Random(0))
    call = {"function": {"name": "lookup", "arguments": "{not json"}}
    assert execute(ex, call).startswith("error") and "no item" in execute(
        ex, {"function": {"name": "lookup", "arguments": json.dumps({"key": "nothing"})}})


# ---- context management -------------------------------------------------------------------------------------------
def test_keep_recent_folds_old_observations_only_and_discard_all_keeps_the_question():
    ex = cm.long_horizon_example(random.Random(1))
    msgs = ex.messages + ex.demo
    folded = cm.keep_recent_k(msgs, 2)
    tools = [i for i, m in enumerate(msgs) if m["role"] == "tool"]
    assert [folded[i]["content"] for i in tools[:-2]] == [cm.PLACEHOLDER] * (len(tools) - 2)
    assert all(folded[i] == msgs[i] for i in range(len(msgs)) if i not in tools[:-2])  # r_i and a_i stay
    assert cm.discard_all(msgs) == ex.messages
    n = len(render(folded, ex.tools, add_generation_prompt=True).ids)
    assert cm.hierarchical(msgs, ex.tools, 2, n) == folded and cm.hierarchical(msgs, ex.tools, 2, n - 1) == ex.messages
    with pytest.raises(ValueError, match="k"):
        cm.keep_recent_k(msgs, -1)


def test_on_the_long_horizon_task_management_succeeds_where_the_full_history_overflows():
    exs = cm.long_horizon_set(3)
    oracle = Oracle(exs)
    assert all(len(render(e.messages + e.demo, e.tools).ids) > cm.WINDOW for e in exs)
    kw = dict(temperature=0.0, window=cm.WINDOW, max_turns=19, max_new_tokens=80)
    none = run_episodes(oracle, exs, execute, agentic_reward, **kw)
    kept = run_episodes(oracle, exs, execute, agentic_reward, manage=lambda m: cm.keep_recent_k(m, cm.KEEP), **kw)
    assert all(r["overflow"] and r["reward"] == 0 for r in none)
    assert all(r["reward"] == 1.0 and r["rewrites"] > 0 for r in kept)
    assert len(kept[0]["samples"]) == kept[0]["rewrites"] + 1  # a rewrite starts a new TITO sample
    tight = run_episodes(oracle, exs[:1], execute, agentic_reward, manage=lambda m: cm.hierarchical(m, exs[0].tools, 2, 600),
                         **{**kw, "max_turns": 12})[0]  # T below the folded context: discard-all, start over
    assert tight["reward"] == 0 and sum(m["role"] == "tool" for m in tight["messages"]) < 4


def test_the_async_loop_adapter_plays_a_chat_episode_through_the_loop_gateway():
    from glm5_ref.apps.post_train.rollout import ChatToolEnv

    ex = agentic_example(random.Random(8), n_items=3)
    env, gw = ChatToolEnv(lambda rng: ex, execute, agentic_reward), TITOGateway()
    traj = env.rollout(lambda: (Oracle([ex]), 3), env, env.sample_task(random.Random(0)), gw, "g0-s0-w0", seed=1)
    assert traj.rollout_id == "g0-s0-w0" and traj.reward == 1.0 and traj.model_versions == [3] * 5 and not gw.live()
    assert traj.ids == render(ex.messages + ex.demo, ex.tools, for_training=True).ids


# ---- the update -------------------------------------------------------------------------------------------------
def _tiny(seed=0):
    from glm5_ref.apps.post_train.pipeline import quick_base

    return quick_base(seed)


def test_eq1_update_trains_pops_mismatched_tokens_and_skips_zero_advantages():
    model = _tiny()
    exs = fixed_set(reasoning_example, 2, "train", 0)
    turns = answer_turns(model, exs, 6, temperature=1.0, seed=0, repeats=2)
    samples = [Sample.from_turn(t["prompt"], t["ids"], t["logprobs"], a) for t, a in zip(turns, (1.0, -1.0, 0.0, 0.0))]
    samples[0].rollout_logprobs = [lp - 3.0 * m for lp, m in zip(samples[0].rollout_logprobs, samples[0].mask)]
    trainer = rl_trainer(model, 1e-3, 4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = eq1_update(trainer, samples, minibatches=2)
    assert stats["samples"] == 2 and stats["frac_popped"] > 0  # rho = e^3 > 2 on sample 0: popped
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and not any(".indexer." in n for n in changed)  # the indexer stays frozen
    assert eq1_update(trainer, [samples[2]]) == {"skipped": 1}


def test_distillation_from_itself_has_zero_advantage_and_reverse_kl():
    model = _tiny()
    exs = fixed_set(general_example, 2, "train", 0)
    turns = answer_turns(model, exs, 6, temperature=1.0, seed=1)
    samples = [Sample.from_turn(t["prompt"], t["ids"], t["logprobs"]) for t in turns]
    teacher = _tiny()
    stats = eq1_update(rl_trainer(model, 1e-3, 2), samples, 1,
                       teacher_logprobs=lambda ids, keep: token_logprobs(teacher, ids))
    assert abs(stats["reverse_kl"]) < 1e-5 and abs(stats["loss"]) < 1e-6


def test_reward_models_train_and_score_in_range():
    from glm5_ref.apps.post_train.rewards import grm_expected, grm_sampled, orm_scores, train_grm, train_orm

    orm, losses = train_orm(_tiny(), steps=2, pairs_per_step=2)
    grm = _tiny()
    train_grm(grm, steps=2, batch=2)
    exs = fixed_set(general_example, 3, "eval", 0)
    answers = ["Rain hushes everything.", "rain rain rain", "This is a sentence about rain."]
    assert len(orm_scores(orm, exs, answers)) == 3 and len(losses) == 2
    assert all(0 <= s <= 1 for s in grm_expected(grm, exs, answers) + grm_sampled(grm, exs, answers,
                                                                                     torch.Generator().manual_seed(0)))


# ---- the pipeline ------------------------------------------------------------------------------------------------
def test_quick_pipeline_runs_every_stage_resumes_and_ships(tmp_path):
    from glm5_ref.apps.post_train.pipeline import run_post_training
    from glm5_ref.pretrained import load_pretrained

    doc = run_post_training(quick=True, out_dir=tmp_path)
    assert doc["stages"][:2] == ["base", "sft"] and set(doc["eval"]) == set(doc["stages"])
    assert set(doc["eval"]["sft"]) >= {"reasoning", "agentic", "instruction", "style", "mean_tokens"}
    assert set(doc["context_management"]) == {"none", "keep-recent-k", "hierarchical"} and doc["seeds"] == [0]
    assert json.loads((tmp_path / "post_training.json").read_text())["stages"] == doc["stages"]
    assert (tmp_path / "post_training.png").stat().st_size > 0
    model, _ = load_pretrained(directory=tmp_path / "classroom-chat")  # verified by its sha256
    with pytest.raises(ValueError, match="--resume"):
        run_post_training(quick=True, out_dir=tmp_path)
    shutil.rmtree(tmp_path / "06_distill")  # a crash in the distillation stage: half of it written
    (tmp_path / "06_distill.tmp").mkdir()
    (tmp_path / "06_distill.tmp" / "junk").write_text("half")
    again = run_post_training(quick=True, out_dir=tmp_path, resume=True)
    assert again["eval"]["sft"] == doc["eval"]["sft"] and again["timing_s"]["sft"] == doc["timing_s"]["sft"]
    assert not (tmp_path / "06_distill.tmp").exists() and (tmp_path / "06_distill" / "result.json").is_file()
    weights = next((tmp_path / "03_reasoning_rl" / "model").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-8])  # truncated: never loaded
    with pytest.raises(ValueError, match="sha256"):
        run_post_training(quick=True, out_dir=tmp_path, resume=True)
