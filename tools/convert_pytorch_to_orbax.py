"""`aki-convert`: see aki_jax/cli/convert.py."""

from aki_jax.cli.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
