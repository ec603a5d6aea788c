"""Train AKI.

  aki-train                                         # configs/tiny_digits.py: a few minutes on a laptop CPU
  aki-train attention=causal                        # the same job with plain causal attention (ablation)
  aki-train --config configs/aki4b_sft.py --init-from /ckpt/aki-4b mesh.fsdp=-1 mesh.data=1
  aki-train --resume [same overrides]               # continue exactly from the latest checkpoint
  aki-train --print-config                          # show the resolved config and exit

(`python train.py ...` is the same command.) Overrides are `key=value` with dotted paths into
`aki_jax.training.TrainConfig` (`optim.lr=3e-4`, `model.decoder.num_layers=4`, `data.batch_size=64`); short
aliases: see `aki_jax.training.config.ALIASES`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from aki_jax.cli import UsageError, make_parser, run_command

# The default job's config lives in the repository's configs/ folder, beside the package.
DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny_digits.py"


def _body(argv: list[str], callbacks=()) -> int:
    parser = make_parser(__doc__, prog="aki-train")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="config file defining get_config()")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in checkpoint.dir")
    parser.add_argument("--init-from", default=None, help="pretrained folder (aki_jax.load_pretrained) to start from")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (dotted paths)")
    args = parser.parse_intermixed_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from aki_jax.training.config import apply_overrides, load_config_file

    if not Path(args.config).is_file():
        raise UsageError(f"--config {args.config}: no such file (a Python file defining get_config())")
    try:
        config = load_config_file(args.config)
    except (ValueError, TypeError) as e:  # messages that already name the file
        raise ValueError(str(e)) from e
    except Exception as e:  # an error inside the user's config file: a failure (exit 1) naming the file
        line = f", line {e.lineno}" if isinstance(e, SyntaxError) and e.lineno else ""
        raise ValueError(f"--config {args.config}{line}: {type(e).__name__}: {e}") from e
    try:
        config = apply_overrides(config, args.overrides)
    except (ValueError, TypeError) as e:  # an unknown key, a value of the wrong type, a value out of range
        raise UsageError(str(e)) from e
    if args.init_from:
        from aki_jax.checkpoint import check_pretrained_folder

        check_pretrained_folder(args.init_from, "--init-from")  # before any JAX work
    if args.resume:
        config = dataclasses.replace(config, resume=True)
    if args.init_from:
        config = dataclasses.replace(config, init_from=args.init_from)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0

    from aki_jax.sharding import finish_distributed
    from aki_jax.training.loop import train

    train(config, callbacks=callbacks)
    finish_distributed("aki-train-finished")  # multi-host: all processes agree before teardown
    return 0


def main(argv: list[str] | None = None, callbacks=()) -> int:
    """`callbacks`: passed to `aki_jax.training.loop.train` (the tests' fault and example-id hooks)."""
    return run_command(lambda args: _body(args, callbacks), argv)


if __name__ == "__main__":
    raise SystemExit(main())
