"""Evaluate a pretrained aki-jax folder on benchmark files (VLMEvalKit-style TSV or JSONL).

    aki-evaluate --checkpoint aki-4b-jax/ --benchmark MMBench_DEV_EN.tsv --benchmark POPE.tsv \
        [--mode likelihood|generate] [--output eval/] [--batch-size 8] [--mesh data=-1] [--dtype bfloat16]

Writes OUTPUT/results.json, OUTPUT/results.md and, per benchmark, OUTPUT/NAME/predictions.jsonl and
scores.json (NAME = the file name without extension). Rerunning the same command resumes: finished
items are read back, not recomputed. Multi-host: start the same command on every host (the
`jax.distributed` cluster is detected from the environment); each host writes its own shard file
into the shared OUTPUT folder.
(`python tools/evaluate.py` is the same command.)
"""

from __future__ import annotations

import logging
from pathlib import Path

from aki_jax.cli import make_parser, run_command


def _body(argv: list[str]) -> int:
    parser = make_parser(__doc__, prog="aki-evaluate")
    parser.add_argument("--checkpoint", required=True, help="pretrained folder (aki_jax.load_pretrained)")
    parser.add_argument("--benchmark", required=True, action="append", help="a .tsv or .jsonl file; repeatable")
    parser.add_argument(
        "--mode",
        choices=["likelihood", "generate"],
        default="likelihood",
        help="multiple choice and yes/no by candidate log-likelihood, or by generated text (VQA is always generated)",
    )
    parser.add_argument("--output", help="output folder (default: eval/<checkpoint folder name>)")
    parser.add_argument(
        "--batch-size", type=int, default=8, help="rows (items) per model call over all devices and hosts (default 8)"
    )
    parser.add_argument(
        "--mesh", default="data=-1", help="mesh axis sizes, e.g. data=-1 or data=2,fsdp=4 (default data=-1)"
    )
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], help="parameter and compute dtype (default: as saved)"
    )
    parser.add_argument("--task", choices=["multiple_choice", "yes_no", "vqa"], help="force the task of every row")
    parser.add_argument(
        "--continuation",
        choices=["letter", "option"],
        default="letter",
        help="likelihood of the letter alone (default) or of 'A. option text'",
    )
    parser.add_argument("--max-new-tokens", type=int, default=16, help="generation length (default 16)")
    parser.add_argument(
        "--length-multiple",
        type=int,
        default=64,
        help="pad sequences to a multiple of this (fewer compilations; default 64)",
    )
    parser.add_argument("--tokenizer", help="tokenizer folder, when the checkpoint has none")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    from aki_jax.sharding import initialize_distributed

    initialize_distributed()  # before any other JAX call; a no-op on one host

    import jax

    from aki_jax.evaluation import job, metrics

    output = args.output or str(Path("eval") / Path(args.checkpoint).resolve().name)
    results = job.evaluate_checkpoint(
        args.checkpoint,
        args.benchmark,
        output,
        mode=args.mode,
        batch_size=args.batch_size,
        mesh=args.mesh,
        dtype=args.dtype,
        task=args.task,
        continuation=args.continuation,
        max_new_tokens=args.max_new_tokens,
        length_multiple=args.length_multiple,
        tokenizer_dir=args.tokenizer,
        progress=not args.no_progress,
    )
    if jax.process_index() == 0:
        print(metrics.markdown_table(results))
        print(f"results: {Path(output) / 'results.json'}")
    from aki_jax.sharding import finish_distributed

    finish_distributed("aki-evaluate-finished")  # multi-host: all processes agree before teardown
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(_body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
