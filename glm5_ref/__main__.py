"""The command line: `python -m glm5_ref COMMAND ...`.

Commands
  demo              the main job (make demo): a tour of GLM-5 from its config (later: train, sample, decode)
  params [--config] parameter counts by component for a preset (glm5, classroom, tiny)
  bench NAME        run a benchmark (see `bench --list`); --json prints one JSON line last
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glm5_ref", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p_demo = sub.add_parser("demo", help="the main job: the GLM-5 tour (and, as they land, train/sample/decode)")
    p_demo.add_argument("--figures", default="figures", help="folder for the figures (default: figures)")

    p_params = sub.add_parser("params", help="parameter counts by component")
    p_params.add_argument("--config", default="glm5", help="glm5, classroom or tiny (default: glm5)")

    p_bench = sub.add_parser("bench", help="run a benchmark")
    p_bench.add_argument("name", nargs="?", help="benchmark name")
    p_bench.add_argument("--json", action="store_true", help="print one JSON line last")
    p_bench.add_argument("--quick", action="store_true", help="small sizes, for CI smoke tests")
    p_bench.add_argument("--list", action="store_true", help="list the benchmarks")

    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from glm5_ref.tour import run_tour

            run_tour(figures_dir=args.figures)
        elif args.command == "params":
            from glm5_ref.config import GLM5Config
            from glm5_ref.tour import params_table

            print(params_table(GLM5Config.preset(args.config)))
        elif args.command == "bench":
            from glm5_ref.bench import BENCHMARKS, run_benchmark

            if args.list or not args.name:
                for name, text in sorted(BENCHMARKS.items()):
                    print(f"{name:16s} {text}")
                return 0
            run_benchmark(args.name, as_json=args.json, quick=args.quick)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
