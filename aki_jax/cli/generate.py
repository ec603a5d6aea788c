"""Ask an AKI checkpoint about images from the command line.

    aki-generate --checkpoint DIR --image cat.jpg --prompt "What is in the picture?"
    aki-generate --checkpoint DIR --image a.png --image b.png --prompt "Compare <image> with <image>." \
        --max-new-tokens 128 --temperature 0.7 --top-p 0.9 --seed 1

DIR is a pretrained folder (`aki_jax.checkpoint.save_pretrained` / `aki-convert`) holding its tokenizer.
The answer is printed as it is generated (greedy unless --temperature > 0). A prompt without `<image>`
placeholders gets one `<image>\\n` per image in front, as in the demo. (`python tools/generate.py` is the
same command.)
"""

from __future__ import annotations

import os
import sys
import time

from aki_jax.cli import UsageError, make_parser, run_command


def _check_arguments(args) -> None:
    """Usage mistakes, found before the (slow) model load."""
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise UsageError(f"--temperature must be >= 0 (0: greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise UsageError(f"--top-p must be in (0, 1], got {args.top_p}")
    placeholders = args.prompt.count("<image>")
    if placeholders and placeholders != len(args.image):
        raise UsageError(
            f"the prompt has {placeholders} <image> placeholders but {len(args.image)} --image were given; "
            f"give one --image per placeholder (or no placeholders: one per image is added in front)"
        )


def _open_images(paths: list[str]) -> list:
    """The --image files decoded (PIL images), each failure naming its file; before the model load."""
    from aki_jax.processing.image import ImageError, open_image

    images = []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--image {path}: no such file")
        try:
            images.append(open_image(path, keep_mode=True))
        except ImageError as e:  # names the file already
            raise ImageError(f"--image {e}; use a PNG, JPEG or WebP file") from e
    return images


def _body(argv: list[str]) -> int:
    parser = make_parser(__doc__.split("\n\n")[0], prog="aki-generate")
    parser.add_argument("--checkpoint", required=True, help="pretrained folder (aki_config.json, params/, tokenizer)")
    parser.add_argument("--image", action="append", default=[], help="image file; repeat for several")
    parser.add_argument("--prompt", required=True, help="the question")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], help="parameter and compute dtype (default: as saved)"
    )
    parser.add_argument("--no-stream", action="store_true", help="print the answer only when it is complete")
    parser.add_argument("--timing", action="store_true", help="report load and generation time on stderr")
    args = parser.parse_args(argv)
    _check_arguments(args)

    from aki_jax.checkpoint import check_pretrained_folder, load_pretrained
    from aki_jax.generation import Sampling, generate_text

    folder = check_pretrained_folder(args.checkpoint, "--checkpoint")
    if not any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model")):
        raise FileNotFoundError(
            f"--checkpoint {args.checkpoint}: no tokenizer files (tokenizer.json or tokenizer.model) in the folder; "
            f"copy the tokenizer of the model into it"
        )
    images = _open_images(args.image)
    start = time.perf_counter()
    model, params, tokenizer = load_pretrained(args.checkpoint, dtype=args.dtype, compute_dtype=args.dtype)
    loaded = time.perf_counter()

    def show(piece: str) -> None:
        print(piece, end="", flush=True)

    answer = generate_text(
        model,
        params,
        tokenizer,
        args.prompt,
        images,
        max_new_tokens=args.max_new_tokens,
        on_text=None if args.no_stream else show,
        sampling=Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed),
    )
    print(answer if args.no_stream else "", flush=True)
    if args.timing:
        done = time.perf_counter()
        print(f"load {loaded - start:.1f}s, generate {done - loaded:.1f}s (incl. compile)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(_body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
