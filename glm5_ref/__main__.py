"""The command line: `python -m glm5_ref COMMAND ...`.

Commands
  demo              the main job (make demo): the GLM-5 tour, the shipped classroom-base model (completions,
                    speculative decoding, dense vs DSA), a live training run of 110 steps (or reuse runs/classroom/)
                    compared with it, figures in runs/demo/, a summary
  train             train a preset on the classroom corpus: --config classroom --minutes N --out DIR [--steps N]
                    [--optimizer adamw|muon|muon_split] [--resume] ...; data parallel on W processes:
                    torchrun --nproc_per_node W -m glm5_ref train ... [--expert-parallel] (gloo on CPU, NCCL on GPUs)
  generate          complete a prompt with a trained checkpoint: --ckpt DIR --prompt "def f(" [--max-new-tokens N
                    --temperature T --seed S]
  --device          train, generate, recipe base and bench: auto|cpu|cuda|mps (auto: CUDA, then Apple's MPS, then
                    the CPU; bf16 autocast on CUDA / MPS). Default cpu (fp32, the same numbers on every machine);
                    under torchrun every rank uses its own device (glm5_ref/devices.py says what runs where)
  params [--config] parameter counts by component for a preset (glm5, classroom, tiny)
  bench NAME        run a benchmark (see `bench --list`); --json prints one JSON line last
  experiment NAME   run an experiment (see `experiment --list`); its full run writes figures/NAME.json and .png;
                    --quick runs a CI-sized version into --out (default runs/experiments/NAME-quick)
  recipe base       GLM-5's pre-training recipe at classroom scale (pre-train, mid-train, DSA warm-up, sparse
                    adaptation; MTP and Muon Split throughout): [--quick] [--out DIR] [--resume]
  recipe ship       measure the recipe's final model and write it, with its model card, to the shipped
                    glm5_ref/assets/checkpoints/classroom-base/: [--out DIR (the recipe run)] [--quick]
  post-train        GLM-5's post-training at classroom scale (SFT, reasoning RL, agentic RL, general RL,
                    cross-stage distillation, context management) from the shipped base: figures/post_training.json
                    and .png, the chat model shipped to glm5_ref/assets/checkpoints/classroom-chat/;
                    [--quick] [--from CKPT] [--out DIR] [--resume]

Bad input (an unknown preset, a folder that holds no checkpoint, a budget <= 0 ...) prints "error: ..." and exits
with status 2.
"""

from __future__ import annotations

import argparse
import os
import sys

# OpenMP threads that spin while they wait for a descheduled peer make a step 10x slower on a machine whose
# cores are shared with other work (measured on a 2-core box: 39 s instead of 3.7 s per classroom step); a
# passive wait costs a few percent on an idle machine. Must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


# `python -m glm5_ref train` unless told otherwise: AdamW at 2e-3, batches of 8 x 256 (the recipe, apps/recipe.py,
# uses Muon Split and MTP from the start; `--optimizer muon_split --lr 8e-3` selects it here)
TRAIN_DEFAULTS = dict(optimizer="adamw", lr=2e-3, batch_size=8, seq_len=256, dsa_stage="dense", num_evals=10,
                      eval_windows_n=64)


def _add_train_options(p: argparse.ArgumentParser, minutes_default: float | None) -> None:
    p.add_argument("--config", default="classroom", help="preset: classroom or tiny (default: classroom)")
    p.add_argument("--minutes", type=float, default=minutes_default, help="wall-clock budget of the training run")
    p.add_argument("--steps", type=int, default=None, help="number of steps (lays the schedule out in steps)")
    p.add_argument("--optimizer", default=None, help="adamw (the train default), muon or muon_split (the demo's)")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: 2e-3 train, 8e-3 demo)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence")
    p.add_argument("--dsa-stage", default=None,
                   help="dense, warmup, sparse, or a schedule such as dense:0.8,warmup:0.05,sparse:0.15")
    p.add_argument("--mtp-depths", type=int, default=None, help="MTP depths trained (default: the config's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


# glm5_ref.devices.DEVICES, spelled out: importing glm5_ref.devices here would load torch before OMP_WAIT_POLICY
DEVICES = ("auto", "cpu", "cuda", "mps")


def _add_device_option(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--device", choices=DEVICES, default=None,
                   help=f"where {what} runs: auto (CUDA, then MPS, then CPU), cpu (the default), cuda or mps")


def _train_kwargs(args: argparse.Namespace) -> dict:
    keys = {"lr": "lr", "batch_size": "batch_size", "seq_len": "seq_len", "dsa_stage": "dsa_stage",
            "mtp_depths": "mtp_depths", "optimizer": "optimizer"}
    return {k: getattr(args, a) for a, k in keys.items() if getattr(args, a) is not None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glm5_ref", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p_demo = sub.add_parser("demo", help="the main job: tour, the shipped model, a live training run, figures")
    p_demo.add_argument("--figures", default=os.path.join("runs", "demo"),
                        help="folder for the figures (default: runs/demo, untracked)")
    p_demo.add_argument("--shipped", default=None, help="a shipped-layout checkpoint folder to show instead of "
                                                         "classroom-base (tests)")
    p_demo.add_argument("--out", default=os.path.join("runs", "classroom"),
                        help="training run folder (default: runs/classroom; a finished checkpoint there is reused)")
    p_demo.add_argument("--fresh", action="store_true", help="train again even if --out holds a finished run")
    p_demo.add_argument("--quick", action="store_true", help="tiny batches and short samples (tests, CI)")
    _add_train_options(p_demo, minutes_default=None)

    p_train = sub.add_parser("train", help="train a preset on the classroom corpus")
    p_train.add_argument("--out", required=True, help="run folder: log.jsonl and checkpoint/ go there")
    p_train.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    p_train.add_argument("--overwrite", action="store_true", help="start over even if --out holds a checkpoint")
    p_train.add_argument("--no-progress", action="store_true", help="no progress bar")
    p_train.add_argument("--expert-parallel", action="store_true",
                         help="under torchrun: shard the routed experts over the ranks (world size must divide them)")
    _add_train_options(p_train, minutes_default=None)
    _add_device_option(p_train, "one process trains (under torchrun: each rank's own device)")

    p_gen = sub.add_parser("generate", help="complete a prompt with a trained checkpoint")
    p_gen.add_argument("--ckpt", required=True, help="a checkpoint folder, or a training run's --out folder")
    p_gen.add_argument("--prompt", required=True)
    p_gen.add_argument("--max-new-tokens", type=int, default=64)
    p_gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p_gen.add_argument("--top-p", type=float, default=0.95)
    p_gen.add_argument("--seed", type=int, default=0)
    _add_device_option(p_gen, "the model generates")

    p_params = sub.add_parser("params", help="parameter counts by component")
    p_params.add_argument("--config", default="glm5", help="glm5, classroom or tiny (default: glm5)")

    p_bench = sub.add_parser("bench", help="run a benchmark")
    p_bench.add_argument("name", nargs="?", help="benchmark name")
    p_bench.add_argument("--json", action="store_true", help="print one JSON line last")
    p_bench.add_argument("--quick", action="store_true", help="small sizes, for CI smoke tests")
    p_bench.add_argument("--list", action="store_true", help="list the benchmarks")
    p_bench.add_argument("--ckpt", default=None, help="spec-decode: a checkpoint instead of the shipped model")
    _add_device_option(p_bench, "both sides of the benchmark run")
    p_rec = sub.add_parser("recipe", help="GLM-5's pre-training recipe at classroom scale, and shipping its model")
    p_rec.add_argument("what", choices=["base", "ship"], help="base: run the recipe; ship: export its final model")
    p_rec.add_argument("--quick", action="store_true", help="the tiny config, a few steps per stage (CI)")
    p_rec.add_argument("--out", default=None, help="the run folder (default runs/recipe-base[-quick])")
    p_rec.add_argument("--resume", action="store_true", help="continue an interrupted run at its stage")
    p_rec.add_argument("--dest", default=None, help="ship: where to write the checkpoint (default: the shipped one)")
    p_rec.add_argument("--cpu-bf16", action="store_true",
                       help="base: train under bf16 autocast on the CPU (faster on CPUs with AMX / AVX512-BF16)")
    _add_device_option(p_rec, "base: the stages train")
    p_post = sub.add_parser("post-train", help="GLM-5's post-training at classroom scale, and shipping the chat model")
    p_post.add_argument("--quick", action="store_true", help="the tiny config, a few steps per stage (CI)")
    p_post.add_argument("--from", dest="from_ckpt", default=None,
                        help="the base checkpoint (default: the shipped classroom-base; --quick: a fresh tiny model)")
    p_post.add_argument("--out", default=None, help="the run folder (default runs/post-train[-quick])")
    p_post.add_argument("--resume", action="store_true", help="continue an interrupted run at its stage")
    p_exp = sub.add_parser("experiment", help="run an experiment")
    p_exp.add_argument("name", nargs="?", help="experiment name")
    p_exp.add_argument("--quick", action="store_true", help="a CI-sized run, written to --out, not figures/")
    p_exp.add_argument("--out", default=None, help="output folder (default: figures/, or runs/experiments/NAME-quick)")
    p_exp.add_argument("--seeds", default=None, help="comma-separated seeds (default: the experiment's)")
    p_exp.add_argument("--list", action="store_true", help="list the experiments")

    args = parser.parse_args(argv)
    try:
        if getattr(args, "threads", None) is not None:
            import torch

            if args.threads < 1:
                raise ValueError(f"--threads: expected a positive integer, got {args.threads}")
            torch.set_num_threads(args.threads)
        if getattr(args, "device", None) is not None:  # an unavailable device: error naming --device, status 2
            from glm5_ref.devices import resolve_device

            resolve_device(args.device, argument="--device")
        if args.command == "demo":
            from glm5_ref.apps.demo import run_demo

            if args.minutes is not None:
                raise ValueError("--minutes: the demo trains for a fixed number of steps (--steps N), so that it "
                                 "sees the same tokens on any machine")
            run_demo(config=args.config, steps=args.steps, out_dir=args.out, figures_dir=args.figures,
                     fresh=args.fresh, quick=args.quick, seed=args.seed, shipped_dir=args.shipped,
                     **_train_kwargs(args))
        elif args.command == "train":
            from glm5_ref.training.options import resolve_config
            from glm5_ref.training.run import train

            if args.minutes is None and args.steps is None:
                raise ValueError("train: give --minutes N (a wall-clock budget) or --steps N")
            dp = None
            from glm5_ref.distributed.data_parallel import DataParallel, init_from_env

            if init_from_env():  # launched by torchrun: every rank runs this same command
                dp = DataParallel(expert_parallel=args.expert_parallel)
            elif args.expert_parallel:
                raise ValueError("--expert-parallel: needs several processes; launch with torchrun --nproc_per_node N")
            kwargs = TRAIN_DEFAULTS | _train_kwargs(args) | ({"device": args.device} if args.device else {})
            if args.device and dp is None:
                from glm5_ref.devices import describe, resolve_device

                print(f"training on {describe(resolve_device(args.device))}")
            if args.seq_len is None:  # the demo's 256, or less for a preset with shorter positions (tiny: 255)
                kwargs["seq_len"] = min(kwargs["seq_len"], resolve_config(args.config).max_position_embeddings - 1)
            result = train(args.config, args.out, minutes=args.minutes, steps=args.steps, seed=args.seed, resume=args.resume, overwrite=args.overwrite,
                           progress=not args.no_progress, data_parallel=dp, **kwargs)
            if dp is None or dp.is_main:
                print(f"trained {result.step} steps ({result.tokens:,} tokens) in {result.elapsed_s:.0f} s; "
                      f"validation {result.final_eval['loss']:.3f} nats/token = {result.final_eval['bpb']:.3f} "
                      f"bits/byte; checkpoint: {result.checkpoint}")
        elif args.command == "generate":
            from glm5_ref.apps.demo import complete
            from glm5_ref.devices import autocast, resolve_device
            from glm5_ref.training.run import load_model

            device = resolve_device(args.device or "cpu", argument="--device")
            model = load_model(args.ckpt).to(device)
            with autocast(device):
                text = complete(model, args.prompt, max_new_tokens=args.max_new_tokens,
                                temperature=args.temperature, top_p=args.top_p, seed=args.seed)
            print(args.prompt + text)
        elif args.command == "params":
            from glm5_ref.config import GLM5Config
            from glm5_ref.apps.tour import params_table

            print(params_table(GLM5Config.preset(args.config)))
        elif args.command == "bench":
            from glm5_ref.apps.bench import BENCHMARKS, run_benchmark

            if args.list or not args.name:
                for name, text in sorted(BENCHMARKS.items()):
                    print(f"{name:16s} {text}")
                return 0
            run_benchmark(args.name, as_json=args.json, quick=args.quick, ckpt=args.ckpt, device=args.device)
        elif args.command == "recipe":
            if args.what == "base":
                from glm5_ref.apps.recipe import run_recipe

                run_recipe(quick=args.quick, out_dir=args.out, resume=args.resume, device=args.device,
                           cpu_bf16=args.cpu_bf16)
            else:
                from glm5_ref.apps.model_card import ship

                if args.device not in (None, "cpu"):
                    raise ValueError("--device: recipe ship measures the model on the CPU (the model card's numbers "
                                     "are fp32 CPU numbers); only recipe base trains on another device")

                ship(run_dir=args.out, quick=args.quick, dest=args.dest)
        elif args.command == "post-train":
            from glm5_ref.apps.post_train.pipeline import run_post_training

            doc = run_post_training(quick=args.quick, from_ckpt=args.from_ckpt, out_dir=args.out, resume=args.resume)
            print("[post-train] goals: " + ", ".join(f"{k} {'ok' if v else 'MISSED'}" for k, v in doc["goals"].items()))
        elif args.command == "experiment":
            from glm5_ref.apps.experiments import EXPERIMENTS, run_experiment

            if args.list or not args.name:
                for name, text in sorted(EXPERIMENTS.items()):
                    print(f"{name:16s} {text}")
                return 0
            seeds = None
            if args.seeds is not None:
                try:
                    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
                except ValueError:
                    raise ValueError(f"--seeds: expected comma-separated integers, got {args.seeds!r}") from None
                if not seeds:
                    raise ValueError(f"--seeds: expected at least one seed, got {args.seeds!r}")
            run_experiment(args.name, quick=args.quick, out_dir=args.out, seeds=seeds)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except FloatingPointError as e:  # a diverged run: not bad input, but still a clear message
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
