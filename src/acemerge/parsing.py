"""Parsing of command-line values, shared by ``acemerge.cli`` and ``acemerge.bench.cli``."""

from __future__ import annotations

import re
from typing import Any

from acemerge.errors import AceMergeError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*$", re.IGNORECASE)


def parse_value(text: str) -> Any:
    """A ``--set`` value: bool, int, float or string."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_assignments(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs from repeated ``--set``."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise AceMergeError(f"--set expects key=value, got {item!r}")
        out[key.strip()] = parse_value(value)
    return out


def parse_size(text: str) -> int:
    """``5GB``, ``500MB``, ``1024`` -> bytes."""
    match = _SIZE.match(text)
    if not match:
        raise AceMergeError(f"--max-shard-size: cannot read {text!r} (e.g. 5GB, 500MB)")
    number, unit = float(match.group(1)), match.group(2).upper()
    return int(number * 1024 ** "_KMGT".index(unit or "_"))


def parse_kmb(text: str) -> int:
    """mergekit's sizes: 5B = 5e9, 500M = 5e8, 10K = 1e4 (bytes), or a plain number."""
    units = {"K": 10**3, "M": 10**6, "B": 10**9}
    text = text.strip().upper()
    try:
        if text and text[-1] in units:
            return int(float(text[:-1]) * units[text[-1]])
        return int(text)
    except ValueError:
        raise AceMergeError(f"--out-shard-size: cannot read {text!r} (e.g. 5B, 500M)") from None


def parse_rank(text: str | None) -> int | str | None:
    """--out-rank: a positive integer, ``exact``, or None (not given)."""
    if text is None or text == "exact":
        return text
    try:
        rank = int(text)
    except ValueError:
        rank = 0
    if rank < 1:
        raise AceMergeError(f"--out-rank: expected a positive integer or exact, got {text!r}")
    return rank
