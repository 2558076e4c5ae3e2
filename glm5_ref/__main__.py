"""The command line: `python -m glm5_ref COMMAND ...`.

Commands
  demo              the main job (make demo): the GLM-5 tour, then train the classroom GLM-5 (about 7 minutes on
                    2 CPU cores, or reuse runs/classroom/), sample Python from it, write figures, summarise
  train             train a preset on the classroom corpus: --config classroom --minutes N --out DIR [--steps N]
                    [--optimizer adamw|muon|muon_split] [--resume] ...; data parallel on W processes:
                    torchrun --nproc_per_node W -m glm5_ref train ... [--expert-parallel] (gloo on CPU, NCCL on GPUs)
  generate          complete a prompt with a trained checkpoint: --ckpt DIR --prompt "def f(" [--max-new-tokens N
                    --temperature T --seed S]
  params [--config] parameter counts by component for a preset (glm5, classroom, tiny)
  bench NAME        run a benchmark (see `bench --list`); --json prints one JSON line last
  experiment NAME   run an experiment (see `experiment --list`); its full run writes figures/NAME.json and .png;
                    --quick runs a CI-sized version into --out (default runs/experiments/NAME-quick)

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


def _add_train_options(p: argparse.ArgumentParser, minutes_default: float | None) -> None:
    p.add_argument("--config", default="classroom", help="preset: classroom or tiny (default: classroom)")
    p.add_argument("--minutes", type=float, default=minutes_default, help="wall-clock budget of the training run")
    p.add_argument("--steps", type=int, default=None, help="number of steps (lays the schedule out in steps)")
    p.add_argument("--optimizer", default="adamw", help="adamw (default), muon or muon_split")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the demo's choice)")
    p.add_argument("--batch-size", type=int, default=None, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per sequence")
    p.add_argument("--dsa-stage", default=None,
                   help="dense, warmup, sparse, or a schedule such as dense:0.8,warmup:0.05,sparse:0.15")
    p.add_argument("--mtp-depths", type=int, default=None, help="MTP depths trained (default: the config's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def _train_kwargs(args: argparse.Namespace) -> dict:
    keys = {"lr": "lr", "batch_size": "batch_size", "seq_len": "seq_len", "dsa_stage": "dsa_stage",
            "mtp_depths": "mtp_depths"}
    return {k: getattr(args, a) for a, k in keys.items() if getattr(args, a) is not None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glm5_ref", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p_demo = sub.add_parser("demo", help="the main job: tour, train (or reuse) the classroom GLM-5, sample, plot")
    p_demo.add_argument("--figures", default="figures", help="folder for the figures (default: figures)")
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

    p_gen = sub.add_parser("generate", help="complete a prompt with a trained checkpoint")
    p_gen.add_argument("--ckpt", required=True, help="a checkpoint folder, or a training run's --out folder")
    p_gen.add_argument("--prompt", required=True)
    p_gen.add_argument("--max-new-tokens", type=int, default=64)
    p_gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p_gen.add_argument("--top-p", type=float, default=0.95)
    p_gen.add_argument("--seed", type=int, default=0)

    p_params = sub.add_parser("params", help="parameter counts by component")
    p_params.add_argument("--config", default="glm5", help="glm5, classroom or tiny (default: glm5)")

    p_bench = sub.add_parser("bench", help="run a benchmark")
    p_bench.add_argument("name", nargs="?", help="benchmark name")
    p_bench.add_argument("--json", action="store_true", help="print one JSON line last")
    p_bench.add_argument("--quick", action="store_true", help="small sizes, for CI smoke tests")
    p_bench.add_argument("--list", action="store_true", help="list the benchmarks")
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
        if args.command == "demo":
            from glm5_ref.apps.demo import run_demo

            run_demo(config=args.config, minutes=args.minutes, steps=args.steps, out_dir=args.out,
                     figures_dir=args.figures, fresh=args.fresh, quick=args.quick, optimizer=args.optimizer,
                     seed=args.seed, **_train_kwargs(args))
        elif args.command == "train":
            from glm5_ref.apps.demo import DEMO_TRAIN
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
            kwargs = {k: v for k, v in DEMO_TRAIN.items() if k not in ("minutes",)} | _train_kwargs(args)
            if args.seq_len is None:  # the demo's 256, or less for a preset with shorter positions (tiny: 255)
                kwargs["seq_len"] = min(kwargs["seq_len"], resolve_config(args.config).max_position_embeddings - 1)
            result = train(args.config, args.out, minutes=args.minutes, steps=args.steps, optimizer=args.optimizer,
                           seed=args.seed, resume=args.resume, overwrite=args.overwrite,
                           progress=not args.no_progress, data_parallel=dp, **kwargs)
            if dp is None or dp.is_main:
                print(f"trained {result.step} steps ({result.tokens:,} tokens) in {result.elapsed_s:.0f} s; "
                      f"validation {result.final_eval['loss']:.3f} nats/token = {result.final_eval['bpb']:.3f} "
                      f"bits/byte; checkpoint: {result.checkpoint}")
        elif args.command == "generate":
            from glm5_ref.apps.demo import complete
            from glm5_ref.training.run import load_model

            model = load_model(args.ckpt)
            text = complete(model, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_p=args.top_p, seed=args.seed)
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
            run_benchmark(args.name, as_json=args.json, quick=args.quick)
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
