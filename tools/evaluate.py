"""`aki-evaluate`: see aki_jax/cli/evaluate.py."""

from aki_jax.cli.evaluate import main

if __name__ == "__main__":
    raise SystemExit(main())
