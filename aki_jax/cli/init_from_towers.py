"""Assemble a fresh AKI from the two public towers: the starting point of the paper's pretraining.

    aki-init-from-towers --vision siglip-so400m-patch14-384/ --lm Phi-3.5-mini-instruct/ --dst aki-4b-init/

--vision: a Hugging Face SigLIP folder (SiglipModel or SiglipVisionModel; the text tower is ignored).
--lm: a Phi-3 / Phi-3.5 `Phi3ForCausalLM` folder. Either may hold one model.safetensors or the released
shards with model.safetensors.index.json. --tokenizer: the tokenizer folder (default: --lm); `<pad>` is
added when it has none (or it equals eos), then `<image>` and `<|endofchunk|>`.
The resampler, the two added-token rows and the output head's bias are drawn as the original initialises
them (see aki_jax/convert/towers.py). Then: `aki-train --config configs/aki4b_pretrain.py --init-from DST`.
"""

from __future__ import annotations

from aki_jax.cli import make_parser, run_command


def _body(argv: list[str]) -> int:
    parser = make_parser(__doc__, prog="aki-init-from-towers")
    parser.add_argument("--vision", required=True, help="Hugging Face SigLIP folder")
    parser.add_argument("--lm", required=True, help="Hugging Face Phi-3 / Phi-3.5 folder")
    parser.add_argument("--tokenizer", help="tokenizer folder (default: --lm)")
    parser.add_argument("--dst", required=True, help="output pretrained folder (must not exist or be empty)")
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
        help="parameter dtype (default float32, the original's master weights)",
    )  # fmt: skip
    parser.add_argument("--num-latents", type=int, help="resampler latents = image tokens per image (default 144)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the newly initialised parameters (default 0)")
    parser.add_argument("--compress", action="store_true", help="zstd-compress the Orbax arrays (slower)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst after success")
    args = parser.parse_args(argv)

    from aki_jax.convert.towers import init_from_towers

    init_from_towers(
        args.vision,
        args.lm,
        args.dst,
        tokenizer=args.tokenizer,
        dtype=args.dtype,
        num_latents=args.num_latents,
        seed=args.seed,
        compress=args.compress,
        overwrite=args.overwrite,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(_body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
