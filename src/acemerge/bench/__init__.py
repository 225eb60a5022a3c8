"""The offline merge benchmark: suites of real experts, normalized accuracy tables."""

from __future__ import annotations

from importlib import import_module

from acemerge.bench.suite import BuiltSuite, Suite, cache_root
from acemerge.errors import AceMergeError

#: Suite name -> "module:class", imported on demand (suites pull in training code).
SUITES = {
    "digits": "acemerge.bench.digits:DigitsSuite",
    "gpt2-text": "acemerge.bench.gpt2_text:Gpt2TextSuite",
    "gpt2-lora": "acemerge.bench.gpt2_lora:Gpt2LoraSuite",
    "minilm": "acemerge.bench.minilm:MiniLMSuite",
}


def get_suite(name: str) -> Suite:
    """A suite by name."""
    if name not in SUITES:
        raise AceMergeError(f"unknown suite '{name}' (available: {', '.join(SUITES)})")
    module, cls = SUITES[name].split(":")
    return getattr(import_module(module), cls)()


__all__ = ["SUITES", "BuiltSuite", "Suite", "cache_root", "get_suite"]
