"""MMA against plain causal attention over several seeds of one config, with a table of the differences.

  aki-ablation                                        # configs/tiny_digits.py, seeds 0 1 2 -> runs/ablation
  aki-ablation --seeds 5 --out runs/ablation5         # five seeds
  aki-ablation --config configs/tiny_digits_pairs.py --out runs/ablation_pairs
  aki-ablation --report-only --out runs/ablation      # rewrite the report from the finished runs

Runs <out>/<attention>_seed<s> one after another, each in its own process (a finished run is skipped, an
interrupted one resumes), then writes <out>/ablation.md (held-out exact match per attention kind as mean
± std over seeds, per question type, and the paired MMA - causal difference with a 95% t-interval),
<out>/ablation.json and <out>/ablation.png. Overrides (`key=value`) apply to every run. Exit code 1 if
any run failed (the report still covers the others).
"""

from __future__ import annotations

import os
import shlex
import sys
import time
from pathlib import Path

from aki_jax.cli import UsageError, make_parser, run_command
from aki_jax.cli.train import DEFAULT_CONFIG


def _parser():
    from aki_jax.training.ablation import KINDS

    parser = make_parser(__doc__, prog="aki-ablation")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="config file defining get_config()")
    parser.add_argument("--out", default="runs/ablation", help="folder of the runs and the report")
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds, 0..N-1 (default 3)")
    parser.add_argument("--seed-list", default=None, help="comma-separated seeds instead of --seeds, e.g. 3,4")
    parser.add_argument(
        "--kinds", default=",".join(KINDS), help="attention kinds, comma-separated (default mma,causal)"
    )
    parser.add_argument("--timeout", type=float, default=None, help="seconds one run may take before it is failed")
    parser.add_argument("--report-only", action="store_true", help="run nothing; report the finished runs")
    parser.add_argument("overrides", nargs="*", help="key=value overrides applied to every run (dotted paths)")
    return parser


def _body(argv: list[str]) -> int:
    from aki_jax.training import ablation
    from aki_jax.training.config import apply_overrides, load_config_file

    args = _parser().parse_intermixed_args(argv)
    if args.seed_list:
        try:
            seeds = [int(s) for s in args.seed_list.split(",") if s.strip()]
        except ValueError as e:
            raise UsageError(f"--seed-list {args.seed_list!r}: seeds must be integers separated by commas") from e
    else:
        if args.seeds < 1:
            raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
        seeds = list(range(args.seeds))
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds or any(k not in ablation.KINDS for k in kinds):
        raise UsageError(f"--kinds {args.kinds!r}: each must be one of {ablation.KINDS}")
    # Fail here, once, on a bad config or override rather than in every run.
    try:
        apply_overrides(load_config_file(args.config), args.overrides)
    except (ValueError, TypeError) as e:
        raise UsageError(str(e)) from e
    start = time.perf_counter()
    load_at_start = [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None
    if args.report_only:
        runs = ablation.collect(args.out, seeds, kinds)
    else:
        runs = ablation.run_all(args.config, args.overrides, seeds, args.out, kinds, timeout_s=args.timeout)
    command = "aki-ablation " + " ".join(shlex.quote(a) for a in argv if a != "--report-only")
    meta = {
        "config": args.config, "overrides": list(args.overrides), "seeds": seeds, "command": command.strip(),
        "wall_s": time.perf_counter() - start, "load_at_start": load_at_start,
    }  # fmt: skip
    ablation.write_report(args.out, runs, meta, kinds)
    print((Path(args.out) / "ablation.md").read_text())
    failed = [r for r in runs if r.status == "failed"]
    if failed:
        names = ", ".join(f"{r.attention} seed {r.seed}" for r in failed)
        print(f"error: {len(failed)} of {len(runs)} runs failed ({names}); see {Path(args.out) / 'ablation.md'}",
              file=sys.stderr)  # fmt: skip
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(_body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
