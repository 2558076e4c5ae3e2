"""GLM-5's post-training at classroom scale (report section 3, Figure 5; issue #19): `python -m glm5_ref post-train`.

    tasks.py, tools.py, anchors.py   the three task families (reasoning, agentic, general) with verifiers and
                                     held-out sets; the catalog + calculator tools; the human-written anchors
    rollout.py                       batched sampling, multi-turn episodes through the TITO gateway, the adapter
                                     for the asynchronous RL loop (apps/agentic.py)
    sft.py                           SFT on the three families and the three thinking modes
    rl_core.py, reasoning_rl.py      GRPO + IcePop (eq. 1) on the training engine; reasoning RL
    agentic_rl.py                    agentic RL: the asynchronous loop over the chat template
    rewards.py, general_rl.py        ORM + GRM; general RL with the hybrid reward, and each reward alone
    distill.py                       on-policy cross-stage distillation (eq. 2 inside eq. 1)
    context.py                       keep-recent-k and hierarchical context management, long-horizon tasks
    evaluate.py, report.py, ship.py  the stage-by-skill matrix, the goals and figure, the shipped chat model
    pipeline.py                      the stages in order, resumable
"""
