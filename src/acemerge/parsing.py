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
