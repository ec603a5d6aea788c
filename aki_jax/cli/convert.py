"""Convert an original PyTorch AKI checkpoint into an aki-jax pretrained folder (Orbax params + config).

    aki-convert --src AKI-4B/ --dst aki-4b-jax/ [--dtype bfloat16] \
        [--lm-config phi35/config.json] [--vision-config siglip/config.json]

--src: a released folder (config.json + model.safetensors or a sharded index, tokenizer files), a single
.safetensors, or a training checkpoint .pt ({"model_state_dict": ...}, `module.` prefixes allowed).
Load it back with `aki_jax.load_pretrained(dst)`. (`python tools/convert_pytorch_to_orbax.py` is the same.)
"""

from __future__ import annotations

from aki_jax.cli import make_parser, run_command


def _body(argv: list[str]) -> int:
    parser = make_parser(__doc__, prog="aki-convert")
    parser.add_argument("--src", required=True, help="original checkpoint: folder, .safetensors or .pt")
    parser.add_argument("--dst", required=True, help="output pretrained folder (must not exist or be empty)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast parameters (default: keep)")
    parser.add_argument("--lm-config", help="Phi-3 config.json (or its folder) of the language model")
    parser.add_argument("--vision-config", help="SigLIP config.json (or its folder) of the vision tower")
    parser.add_argument("--aki-config", help="an aki_config.json to use instead of translating the configs")
    parser.add_argument("--compress", action="store_true", help="zstd-compress the Orbax arrays (slower)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst after success")
    args = parser.parse_args(argv)

    from aki_jax.config import AKIConfig
    from aki_jax.convert.torch_import import convert_pytorch_to_orbax

    convert_pytorch_to_orbax(
        args.src,
        args.dst,
        dtype=args.dtype,
        lm_config=args.lm_config,
        vision_config=args.vision_config,
        config=AKIConfig.from_json(args.aki_config) if args.aki_config else None,
        compress=args.compress,
        overwrite=args.overwrite,
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(_body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
