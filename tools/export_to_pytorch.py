"""Export an aki-jax pretrained folder to the original PyTorch AKI layout (config.json + model.safetensors).

    python tools/export_to_pytorch.py --src aki-4b-jax/ --dst aki-4b-torch/ [--vision-head-from AKI-4B/]

The SigLIP pooling head (`vision_encoder.head.*`, unused by AKI) is not an aki-jax parameter; without
--vision-head-from it is left out and the original code keeps its initial values for it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aki_jax.convert.mapping import ConversionError  # noqa: E402
from aki_jax.convert.torch_export import export_orbax_to_pytorch  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="aki-jax pretrained folder (aki_config.json + params/)")
    parser.add_argument("--dst", required=True, help="output folder (must not exist or be empty)")
    parser.add_argument("--vision-head-from", help="original checkpoint to copy vision_encoder.head.* from")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst after success")
    args = parser.parse_args(argv)
    try:
        export_orbax_to_pytorch(args.src, args.dst, vision_head_from=args.vision_head_from, overwrite=args.overwrite)
    except (ConversionError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
