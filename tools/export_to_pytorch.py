"""`aki-export`: see aki_jax/cli/export.py."""

from aki_jax.cli.export import main

if __name__ == "__main__":
    raise SystemExit(main())
