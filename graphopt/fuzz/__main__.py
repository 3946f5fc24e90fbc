"""``python -m graphopt.fuzz --graphs 5000``: a long differential-fuzzing campaign.

The same options as ``graphopt fuzz``; exits 1 when any graph failed. ``--target arm64`` builds for
aarch64 and runs every build under qemu-aarch64 (one emulated process for the whole campaign);
``--passes none`` leaves out the passes-alone stages, e.g. for a campaign on the aarch64 build only.
"""

from __future__ import annotations

import argparse
import sys


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--graphs", type=int, default=100, help="number of random models (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="first seed; graph i uses seed+i (default: %(default)s)")
    p.add_argument("--max-ops", type=int, default=10, help="most ops per model (default: %(default)s)")
    p.add_argument("--passes", help="comma-separated passes to fuzz alone (default: every registered pass; "
                                    "'none' skips them)")
    p.add_argument("--pipeline", default="default", help="pipeline to fuzz whole (default: %(default)s; 'none' skips)")
    p.add_argument("--target", default="x86", help="target to build for (default: %(default)s; 'none' skips; "
                                                    "arm64 and other aarch64 presets run under qemu-aarch64)")
    p.add_argument("--batch", type=int, default=8,
                   help="models captured and built together (default: %(default)s; 1 checks each alone)")
    p.add_argument("--no-isolate", action="store_true",
                   help="check in this process (faster start; a crashing kernel then ends the campaign)")
    p.add_argument("--no-minimize", action="store_true", help="report failures without shrinking them")


def run(args: argparse.Namespace) -> int:
    from graphopt.fuzz.campaign import fuzz
    from graphopt.fuzz.harness import default_stages

    names = [p.strip() for p in args.passes.split(",")] if args.passes else None
    passes = [p for p in names if p and p != "none"] if names is not None else None
    pipeline = None if args.pipeline == "none" else args.pipeline
    target = None if args.target == "none" else args.target
    stages = default_stages(passes, pipeline, target)
    print(f"fuzzing {args.graphs} graphs from seed {args.seed}; stages: {', '.join(s.name for s in stages)}",
          flush=True)
    report = fuzz(args.graphs, args.seed, stages, max_ops=args.max_ops, batch=args.batch,
                  isolate=not args.no_isolate, minimize=not args.no_minimize,
                  log=lambda text: print(text, flush=True))
    print(report.summary())
    return 1 if report.failures else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m graphopt.fuzz", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
