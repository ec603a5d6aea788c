"""Ask an AKI checkpoint about your own images in a browser (a Gradio page on this machine).

    aki-demo                                        # the default training job's model (after `aki-train`)
    aki-demo --checkpoint DIR --host 0.0.0.0 --port 7860 --dtype bfloat16

Upload one or several images, type a question, and the answer streams in; greedy or sampled decoding
(temperature, top-k, top-p, seed) and max new tokens are on the page, and so is "what the model sees":
the prompt's modality layout and its MMA attention mask next to the causal one. The model is loaded
and compiled once at start (the page and the console say how long that took); requests queue and run
one at a time. Needs the `demo` extra: pip install 'aki-jax[demo]'.
"""

from __future__ import annotations

import time
from pathlib import Path

from aki_jax.checkpoint import CONFIG_FILE
from aki_jax.cli import UsageError, make_parser, run_command


def default_checkpoint() -> Path:
    """The folder the default training job exports its model to (relative to the working directory)."""
    from aki_jax.cli.train import DEFAULT_CONFIG
    from aki_jax.training.config import load_config_file

    config = load_config_file(DEFAULT_CONFIG)
    return config.checkpoint.pretrained_dir(config.model.attention)


def build_parser():
    parser = make_parser(__doc__, prog="aki-demo")
    parser.add_argument(
        "--checkpoint", default=None, help="pretrained folder (default: the default training job's exported model)"
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (0.0.0.0: reachable from others)")
    parser.add_argument("--port", type=int, default=7860, help="port to serve on (default 7860)")
    parser.add_argument("--dtype", default=None, help="parameter and compute dtype, e.g. bfloat16 (default: saved)")
    return parser


def resolve_checkpoint(checkpoint: str | None) -> Path:
    """--checkpoint, or the default job's model; a missing default says how to make one."""
    if checkpoint is not None:
        return Path(checkpoint)
    default = default_checkpoint()
    if not (default / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"no --checkpoint given and the default training job's model {default} does not exist here: train it "
            f"with `aki-train` (or `python train.py`, a few minutes on a CPU) in this folder, or pass --checkpoint DIR"
        )
    return default


def _body(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if not 0 <= args.port < 65536:
        raise UsageError(f"--port must be in 0..65535, got {args.port}")
    checkpoint = resolve_checkpoint(args.checkpoint)
    try:
        from aki_jax.serving.demo import build_demo, launch
    except ImportError as e:
        raise RuntimeError(f"{e}; the demo needs Gradio: pip install 'aki-jax[demo]'") from e
    from aki_jax.serving import Answerer
    from aki_jax.serving.answerer import PROMPT_BUCKET

    print(f"loading {checkpoint} ...", flush=True)
    start = time.perf_counter()
    answerer = Answerer.from_pretrained(checkpoint, dtype=args.dtype)
    timings = answerer.timings
    note = (
        f"Model `{checkpoint}`: loaded in {timings['load_s']:.1f} s, generation compiled in "
        f"{timings['compile_s']:.1f} s (another image count or max new tokens, or a prompt past {PROMPT_BUCKET} "
        "tokens, compiles once more on first use)."
    )
    print(f"ready after {time.perf_counter() - start:.1f} s: {note}", flush=True)
    launch(build_demo(answerer, note=note), host=args.host, port=args.port, block=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(_body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
