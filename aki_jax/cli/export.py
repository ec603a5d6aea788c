"""Export an aki-jax pretrained folder to the original PyTorch AKI layout (config.json + model.safetensors).

    aki-export --src aki-4b-jax/ --dst aki-4b-torch/ [--vision-head-from AKI-4B/]

The SigLIP pooling head (`vision_encoder.head.*`, unused by AKI) is not an aki-jax parameter; without
--vision-head-from it is left out and the original code keeps its initial values for it.
(`python tools/export_to_pytorch.py` is the same command.)
"""

from __future__ import annotations

from aki_jax.cli import make_parser, run_command


def _body(argv: list[str]) -> int:
    parser = make_parser(__doc__, prog="aki-export")
    parser.add_argument("--src", required=True, help="aki-jax pretrained folder (aki_config.json + params/)")
    parser.add_argument("--dst", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--vision-head-from", help="original checkpoint to copy vision_encoder.head.* from")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst after success")
    args = parser.parse_args(argv)

    from aki_jax.convert.torch_export import export_orbax_to_pytorch

    export_orbax_to_pytorch(args.src, args.dst, vision_head_from=args.vision_head_from, overwrite=args.overwrite)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_command(_body, argv)


if __name__ == "__main__":
    raise SystemExit(main())
