"""`python train.py` = `aki-train`: see aki_jax/cli/train.py."""

from aki_jax.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
