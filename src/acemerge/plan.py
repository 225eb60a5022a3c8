"""The merge plan: which parameter gets which treatment, and in which orientation.

Module types come from the architecture itself when the base has a ``config.json``: the
model is built on the ``meta`` device (no memory, no weights) and each parameter's module
tells whether it is a ``Linear`` (stored (d_out, d_in)), a GPT-2 style ``Conv1D`` (stored
(d_in, d_out), transposed for the method) or an ``Embedding``. Without a config, names and
shapes decide.
"""

from __future__ import annotations

import contextlib
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum

import torch

from acemerge.errors import AceMergeError


class Treatment(str, Enum):
    """What the engine does with one parameter."""

    MATRIX = "matrix"  # the method's matrix rule on (d_out, d_in)
    OTHER = "other"  # the method's non-matrix rule (mean for ACE)
    KEEP = "keep"  # base value, unchanged


class ModuleKind(str, Enum):
    """What kind of module a parameter belongs to."""

    LINEAR = "linear"
    CONV1D = "conv1d"
    EMBEDDING = "embedding"
    OTHER = "other"


@dataclass(frozen=True)
class Profile:
    """Default exclusions for a family of architectures (the ACE authors' runs)."""

    name: str
    model_types: tuple[str, ...]
    exclude: tuple[str, ...]


PROFILES: tuple[Profile, ...] = (
    Profile(
        "decoder-llm",
        ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma",
         "gemma2", "gemma3_text", "phi", "phi3", "olmo", "olmo2", "falcon", "gpt_neox",
         "stablelm", "starcoder2", "cohere", "granite", "internlm2", "deepseek_v2"),
        (r"(^|\.)embed_tokens\.", r"(^|\.)lm_head\."),
    ),
    Profile("gpt2", ("gpt2",), (r"(^|\.)score\.",)),
    Profile(
        "bert-family",
        ("bert", "roberta", "xlm-roberta", "distilbert", "electra", "deberta", "deberta-v2",
         "albert", "mpnet", "camembert"),
        (r"(^|\.)classifier\.", r"\.bias$", r"LayerNorm", r"(^|\.)embeddings\."),
    ),
    Profile("vit", ("vit", "clip", "clip_vision_model", "siglip", "siglip_vision_model",
                    "dinov2", "deit"), ()),
)

#: For unknown architectures: classification heads and vocabulary matrices stay at base.
GENERIC_PROFILE = Profile(
    "generic", (), (r"(^|\.)(classifier|score|lm_head)\.", r"(^|\.)embed_tokens\.")
)

_EMBEDDING_NAME = re.compile(r"(embed|wte|wpe|shared)", re.IGNORECASE)


def profile_for(model_type: str | None) -> Profile:
    """The exclusion profile of a ``config.json`` model_type."""
    for profile in PROFILES:
        if model_type in profile.model_types:
            return profile
    return GENERIC_PROFILE


@dataclass(frozen=True)
class PlanEntry:
    """One parameter of the plan."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    treatment: Treatment
    transpose: bool
    reason: str
    kind: ModuleKind = ModuleKind.OTHER

    @property
    def numel(self) -> int:
        n = 1
        for size in self.shape:
            n *= size
        return n


@dataclass
class Plan:
    """The ordered list of parameters with their treatments."""

    entries: list[PlanEntry]
    profile: str
    exclude: list[str] = field(default_factory=list)

    @property
    def total_numel(self) -> int:
        return sum(entry.numel for entry in self.entries)

    def counts(self) -> dict[str, int]:
        """How many parameters get each treatment."""
        out = {t.value: 0 for t in Treatment}
        for entry in self.entries:
            out[entry.treatment.value] += 1
        return out


def module_kinds_from_config(config: dict) -> tuple[dict[str, ModuleKind], str]:
    """Build the architecture on the meta device; map parameter names to module kinds.

    Returns the map and the model's ``base_model_prefix``. An empty map when the
    architecture cannot be built (unknown to the installed ``transformers``).
    """
    import transformers
    from transformers.pytorch_utils import Conv1D

    try:
        cfg = transformers.AutoConfig.for_model(**config)
        model_cls = _model_class(cfg)
        with torch.device("meta"), _quiet_transformers():
            build = getattr(model_cls, "from_config", model_cls)
            model = build(cfg)
    except Exception:  # noqa: BLE001 - any failure means "fall back to heuristics"
        return {}, ""
    kinds: dict[str, ModuleKind] = {}
    for module_name, module in model.named_modules():
        if isinstance(module, Conv1D):
            kind = ModuleKind.CONV1D
        elif isinstance(module, torch.nn.Linear):
            kind = ModuleKind.LINEAR
        elif isinstance(module, torch.nn.Embedding):
            kind = ModuleKind.EMBEDDING
        else:
            kind = ModuleKind.OTHER
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            kinds[full] = kind
    return kinds, getattr(model, "base_model_prefix", "") or ""


def _model_class(cfg: object) -> type:
    import transformers

    for arch in getattr(cfg, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if cls is not None:
            return cls
    return transformers.AutoModel


@contextlib.contextmanager
def _quiet_transformers() -> Iterable[None]:
    import transformers

    previous = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        transformers.logging.set_verbosity(previous)


def lookup_kind(name: str, kinds: dict[str, ModuleKind], prefix: str) -> ModuleKind | None:
    """Module kind of a checkpoint key, allowing for a missing or extra model prefix."""
    candidates = [name]
    if prefix:
        candidates += [name.removeprefix(prefix + "."), f"{prefix}.{name}"]
    for candidate in candidates:
        if candidate in kinds:
            return kinds[candidate]
    return None


def guess_kind(name: str, shape: tuple[int, ...]) -> ModuleKind:
    """Kind from the name and shape alone (no config): 2-D ``*.weight`` is a Linear."""
    if len(shape) != 2 or not name.endswith("weight"):
        return ModuleKind.OTHER
    if _EMBEDDING_NAME.search(name):
        return ModuleKind.EMBEDDING
    return ModuleKind.LINEAR


def build_plan(
    tensors: Iterable[tuple[str, tuple[int, ...], torch.dtype]],
    config: dict | None = None,
    exclude: Iterable[str] = (),
    default_excludes: bool = True,
    conv1d_as_stored: bool = False,
) -> Plan:
    """Decide every parameter's treatment.

    ``exclude`` adds regular expressions (``re.search`` on the name) of parameters that
    keep their base value; ``default_excludes`` adds the architecture's defaults.
    ``conv1d_as_stored`` reproduces the ACE authors' code, which merges GPT-2 ``Conv1D``
    weights without transposing them (input and output axes swapped).
    """
    model_type = (config or {}).get("model_type")
    profile = profile_for(model_type)
    patterns = (list(profile.exclude) if default_excludes else []) + list(exclude)
    compiled = [_compile(p) for p in patterns]
    kinds, prefix = module_kinds_from_config(config) if config else ({}, "")
    entries = [
        _entry(name, tuple(shape), dtype, compiled, kinds, prefix, conv1d_as_stored)
        for name, shape, dtype in tensors
    ]
    return Plan(entries=entries, profile=profile.name, exclude=patterns)


def _compile(pattern: str) -> re.Pattern[str]:
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise AceMergeError(f"invalid exclude pattern {pattern!r}: {exc}") from None


def _entry(
    name: str,
    shape: tuple[int, ...],
    dtype: torch.dtype,
    excludes: list[re.Pattern[str]],
    kinds: dict[str, ModuleKind],
    prefix: str,
    conv1d_as_stored: bool,
) -> PlanEntry:
    for pattern in excludes:
        if pattern.search(name):
            reason = f"excluded by {pattern.pattern!r}"
            return PlanEntry(name, shape, dtype, Treatment.KEEP, False, reason)
    if not dtype.is_floating_point:
        return PlanEntry(name, shape, dtype, Treatment.KEEP, False, f"{str(dtype)[6:]} buffer")
    kind = lookup_kind(name, kinds, prefix)
    source = "module"
    if kind is None:
        kind, source = guess_kind(name, shape), "name"
    if len(shape) == 2 and kind in (ModuleKind.LINEAR, ModuleKind.CONV1D):
        transpose = kind is ModuleKind.CONV1D and not conv1d_as_stored
        how = "Conv1D, transposed" if transpose else kind.value
        if kind is ModuleKind.CONV1D and conv1d_as_stored:
            how = "Conv1D as stored (authors' behaviour)"
        return PlanEntry(name, shape, dtype, Treatment.MATRIX, transpose, f"{how} ({source})",
                         kind)
    return PlanEntry(name, shape, dtype, Treatment.OTHER, False, f"{kind.value} ({source})",
                     kind)
