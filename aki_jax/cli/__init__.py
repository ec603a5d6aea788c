"""Command-line entry points of aki-jax, one module each, installed as console scripts.

Every command is `main(argv: list[str] | None = None) -> int` built with `run_command`, so they all
share one convention:

- exit code 0: done; 1: the command ran and failed (a missing or damaged file, bad data beyond the
  allowed fraction, ...); 2: it was called wrongly (unknown flag, bad override, invalid value);
- a failure prints one line, `error: <what is wrong and what to do>`, on stderr, never a traceback;
  `--debug` (any position) or the environment variable `AKI_DEBUG=1` re-raises it with its traceback.

Raise `UsageError` for a mistake in how the command was called; any other exception is a failure.
`train.py` and `tools/*.py` are two-line shims over these modules.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

DEBUG_ENV = "AKI_DEBUG"


class UsageError(ValueError):
    """The command was called wrongly (exit code 2): a bad flag, override or value."""


class _Parser(argparse.ArgumentParser):
    """argparse whose errors are `UsageError`s, so they print like every other error (exit 2)."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message} (see {self.prog} --help)")


def make_parser(doc: str | None, prog: str | None = None, **kwargs) -> argparse.ArgumentParser:
    """An argument parser for a command: its docstring as description, `--debug` accepted everywhere."""
    parser = _Parser(prog=prog, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)
    parser.add_argument(
        "--debug", action="store_true", help=f"show the full traceback of an error (or set {DEBUG_ENV}=1)"
    )
    return parser


def _debugging(argv: Sequence[str]) -> bool:
    return "--debug" in argv or os.environ.get(DEBUG_ENV, "").lower() not in ("", "0", "false", "no")


def _one_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    if isinstance(error, (FileNotFoundError, PermissionError, IsADirectoryError)) and error.filename:
        text = f"{error.filename}: {error.strerror or text}"
    elif isinstance(error, KeyError):  # str(KeyError) quotes its argument
        text = f"{type(error).__name__}: {text}"
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[0] if len(lines) == 1 else "; ".join(line.strip() for line in lines)


def run_command(body: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Run `body(argv)` under the project's CLI convention; returns the exit code (never raises for errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = _debugging(argv)
    try:
        code = body(argv)
    except SystemExit as e:  # argparse --help (0) or a body that exits on purpose
        if e.code is None or isinstance(e.code, int):
            return int(e.code or 0)
        print(f"error: {e.code}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        if debug:
            raise
        print("error: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        message = _one_line(e)
        if not isinstance(e, (OSError, ValueError, LookupError)):  # not a user error: probably a bug
            message = f"{type(e).__name__}: {message} (unexpected; rerun with --debug for the traceback)"
        print(f"error: {message}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1
    return 0 if code is None else int(code)


__all__ = ["DEBUG_ENV", "UsageError", "make_parser", "run_command"]
