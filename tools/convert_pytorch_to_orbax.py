"""Convert an original PyTorch AKI checkpoint into an aki-jax pretrained folder (Orbax params + config).

    python tools/convert_pytorch_to_orbax.py --src AKI-4B/ --dst aki-4b-jax/ [--dtype bfloat16] \
        [--lm-config phi35/config.json] [--vision-config siglip/config.json]

--src: a released folder (config.json + model.safetensors or a sharded index, tokenizer files), a single
.safetensors, or a training checkpoint .pt ({"model_state_dict": ...}, `module.` prefixes allowed).
Load it back with `aki_jax.load_pretrained(dst)`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aki_jax.config import AKIConfig  # noqa: E402
from aki_jax.convert.mapping import ConversionError  # noqa: E402
from aki_jax.convert.torch_import import convert_pytorch_to_orbax  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", required=True, help="original checkpoint: folder, .safetensors or .pt")
    parser.add_argument("--dst", required=True, help="output pretrained folder (must not exist or be empty)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast parameters (default: keep)")
    parser.add_argument("--lm-config", help="Phi-3 config.json (or its folder) of the language model")
    parser.add_argument("--vision-config", help="SigLIP config.json (or its folder) of the vision tower")
    parser.add_argument("--aki-config", help="an aki_config.json to use instead of translating the configs")
    parser.add_argument("--compress", action="store_true", help="zstd-compress the Orbax arrays (slower)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --dst after success")
    args = parser.parse_args(argv)
    try:
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
    except (ConversionError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
