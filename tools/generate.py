"""`aki-generate`: see aki_jax/cli/generate.py."""

from aki_jax.cli.generate import main

if __name__ == "__main__":
    raise SystemExit(main())
