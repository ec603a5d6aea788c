"""File patterns: brace ranges and lists (`shard-{00000..01000}.tar`, `{train,val}.jsonl`) and globs."""

from __future__ import annotations

import glob
import itertools
import os
import re

_BRACE = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)$")


def expand_braces(pattern: str) -> list[str]:
    """All strings a brace pattern stands for, in order.

    `a{00..02}b` -> a00b a01b a02b (zero padding taken from the wider bound);
    `x.{jpg,png}` -> x.jpg x.png; several braces give their product.
    """
    parts = _BRACE.split(pattern)  # literal, brace body, literal, brace body, ...
    choices = []
    for i, part in enumerate(parts):
        if i % 2 == 0:
            choices.append([part])
            continue
        match = _RANGE.match(part)
        if match:
            lo, hi = match.groups()
            width = max(len(lo), len(hi)) if (lo.startswith("0") or hi.startswith("0")) else 0
            start, stop = int(lo), int(hi)
            step = 1 if stop >= start else -1
            choices.append([str(n).zfill(width) for n in range(start, stop + step, step)])
        elif "," in part:
            choices.append(part.split(","))
        else:
            choices.append(["{" + part + "}"])
    return ["".join(combo) for combo in itertools.product(*choices)]


def resolve_files(pattern: str, what: str) -> list[str]:
    """Existing files for a pattern (braces, then globs). Fails naming the pattern if any part is missing.

    A brace range names files that must all exist (a missing shard is a configuration mistake, not bad
    data); a glob must match at least one file.
    """
    files = []
    missing = []
    for candidate in expand_braces(os.path.expanduser(pattern)):
        if glob.has_magic(candidate):
            matched = sorted(glob.glob(candidate))
            if not matched:
                missing.append(candidate)
            files.extend(matched)
        elif os.path.isfile(candidate):
            files.append(candidate)
        else:
            missing.append(candidate)
    if missing:
        shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
        raise FileNotFoundError(f"{what}: no file matches {shown} (pattern {pattern!r})")
    if not files:
        raise FileNotFoundError(f"{what}: pattern {pattern!r} matches no files")
    return files
