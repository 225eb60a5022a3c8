"""Seeds derived from names (helper, not a method): reproducible random masks that do not
depend on the device or on the order in which parameters stream."""

from __future__ import annotations

import hashlib


def derived_seed(*parts: object) -> int:
    """A 63-bit generator seed from a BLAKE2b digest of ``parts``, stable across runs."""
    text = ":".join(str(part) for part in parts)
    digest = hashlib.blake2b(text.encode(), digest_size=8)
    return int.from_bytes(digest.digest(), "little") >> 1
