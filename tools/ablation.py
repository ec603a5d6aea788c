"""`aki-ablation`: see aki_jax/cli/ablation.py."""

from aki_jax.cli.ablation import main

if __name__ == "__main__":
    raise SystemExit(main())
