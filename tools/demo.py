"""`aki-demo`: see aki_jax/cli/demo.py."""

from aki_jax.cli.demo import main

if __name__ == "__main__":
    raise SystemExit(main())
