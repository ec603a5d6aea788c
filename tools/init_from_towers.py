"""`aki-init-from-towers`: see aki_jax/cli/init_from_towers.py."""

from aki_jax.cli.init_from_towers import main

if __name__ == "__main__":
    raise SystemExit(main())
