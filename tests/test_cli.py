"""Every console script declared in pyproject.toml imports, prints its help and exits 0; misuse exits 2."""

import importlib
import tomllib
from pathlib import Path

import pytest

SCRIPTS = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]["scripts"]


def _main(target: str):
    module, function = target.split(":")
    return getattr(importlib.import_module(module), function)


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_help_runs(script, capsys):
    assert _main(SCRIPTS[script])(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {script}") and "--debug" in out


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_console_script_unknown_flag_is_a_usage_error(script, capsys):
    assert _main(SCRIPTS[script])(["--no-such-flag"]) == 2
    err = capsys.readouterr().err
    # argparse names the unknown flag, or first the required arguments missing beside it
    assert err.startswith(f"error: {script}: ") and f"see {script} --help" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
