"""PEFT LoRA adapters as experts: an adapter folder read against its base checkpoint.

An adapter (``adapter_config.json`` + ``adapter_model.safetensors`` or ``.bin``) holds, per
target module, ``base_model.model.<module>.lora_A.weight`` (r x d_in) and ``lora_B.weight``
(d_out x r); the module's task vector is s * B @ A with s = lora_alpha / r, or
lora_alpha / sqrt(r) with rsLoRA, transposed for ``fan_in_fan_out`` (GPT-2 Conv1D stores
(d_in, d_out)). Embeddings use ``lora_embedding_A`` (r x num_embeddings) and
``lora_embedding_B`` (dim x r), task vector (s * B @ A)^T. Any other saved tensor
(``modules_to_save`` copies, trained biases) replaces the base parameter of that name. A
module the adapter does not touch has task vector 0. The task vector is computed directly
(never as (base + delta) - base), exactly as PEFT merges it.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from acemerge.errors import AceMergeError
from acemerge.io.readers import (
    Checkpoint,
    download,
    load_torch_state_dict,
    looks_like_hub_id,
    one_line,
    open_checkpoint,
    open_folder,
    read_safetensors_header,
)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PEFT_PREFIX = "base_model.model."
_FACTOR_KEYS = {"lora_A": ("A", "linear"), "lora_B": ("B", "linear"),
                "lora_embedding_A": ("A", "embedding"), "lora_embedding_B": ("B", "embedding")}


@dataclass
class LoraModule:
    """One adapted module: its factors, scaling and how the product maps onto the weight."""

    module: str
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    kind: str = "linear"
    scale: float = 1.0
    transpose: bool = False  # the stored weight is (B @ A)^T

    def factors(self, dtype: torch.dtype, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """(left, right) with left @ right = :meth:`delta` (the scaling on the left)."""
        assert self.a is not None and self.b is not None
        b = self.b.to(device=device, dtype=dtype) * self.scale
        a = self.a.to(device=device, dtype=dtype)
        return (a.T, b.T) if self.transpose else (b, a)

    def delta(self, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """s * B @ A in the base weight's layout."""
        left, right = self.factors(dtype, device)
        return left @ right


def is_adapter_folder(path: Path) -> bool:
    """Whether ``path`` is a PEFT adapter folder."""
    return path.is_dir() and (path / ADAPTER_CONFIG).is_file()


def read_adapter_config(folder: Path) -> dict:
    """The adapter's config, checked for what acemerge supports (LoRA, not DoRA)."""
    path = folder / ADAPTER_CONFIG
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AceMergeError(f"{path}: invalid JSON ({one_line(exc)})") from None
    kind = str(config.get("peft_type", "LORA")).upper()
    if kind != "LORA":
        raise AceMergeError(f"{path}: adapter type {kind} is not supported (LoRA only)")
    if config.get("use_dora"):
        raise AceMergeError(f"{path}: DoRA adapters are not supported (LoRA only)")
    if config.get("alpha_pattern"):
        raise AceMergeError(f"{path}: alpha_pattern is not supported")
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        raise AceMergeError(f"{path}: 'r' must be a positive integer")
    return config


def read_adapter_tensors(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The adapter's tensors (safetensors preferred, pickled .bin with weights_only)."""
    for name in ADAPTER_FILES:
        path = folder / name
        if not path.is_file():
            continue
        if path.suffix == ".safetensors":
            read_safetensors_header(path)  # validates the file, one-line error
            from safetensors.torch import load_file

            return load_file(path), path
        return load_torch_state_dict(path), path
    raise AceMergeError(f"{folder}: no adapter weights (expected {' or '.join(ADAPTER_FILES)})")


class LoraExpert(Checkpoint):
    """An expert given as a LoRA adapter on ``base``: the base's parameters, plus the
    adapter's update on the modules it targets."""

    def __init__(self, folder: Path, base: Checkpoint, label: str | None = None,
                 allow_base_mismatch: bool = False) -> None:
        self.folder, self.base = folder, base
        self.label = label or str(folder)
        self.config = base.config
        self.adapter_config = read_adapter_config(folder)
        tensors, path = read_adapter_tensors(folder)
        self.files = (folder / ADAPTER_CONFIG, path)
        self._check_base(allow_base_mismatch)
        self.modules, self.replaced = self._parse(tensors)

    # -- reading

    def _check_base(self, allow: bool) -> None:
        named = self.adapter_config.get("base_model_name_or_path")
        if allow or not named:
            return
        known = {self.base.label, str((self.base.config or {}).get("_name_or_path", ""))}
        if self.base.folder is not None:
            known.add(str(self.base.folder.resolve()))
        local = Path(named).expanduser()
        target = str(local.resolve()) if local.exists() else named
        if target not in known and named not in known:
            raise AceMergeError(
                f"{self.label}: adapter was trained on '{named}', not on the base "
                f"'{self.base.label}' (--allow-base-mismatch to merge it anyway)")

    def _base_name(self, module: str, suffix: str = "weight") -> str:
        """The base parameter of ``module`` (exact, or the unique suffix match)."""
        specs = self.base.specs()
        wanted = f"{module}.{suffix}"
        if wanted in specs:
            return wanted
        matches = [n for n in specs if n.endswith("." + wanted) or wanted.endswith("." + n)]
        if len(matches) != 1:
            raise AceMergeError(f"{self.label}: target module '{module}' has no parameter "
                                "in the base")
        return matches[0]

    def _parse(self, tensors: dict[str, torch.Tensor]
               ) -> tuple[dict[str, LoraModule], dict[str, torch.Tensor]]:
        modules: dict[str, LoraModule] = {}
        replaced: dict[str, torch.Tensor] = {}
        for key, tensor in tensors.items():
            name = key.removeprefix(PEFT_PREFIX)
            parts = name.split(".")
            factor = next((p for p in parts if p in _FACTOR_KEYS), None)
            if factor is None:  # a saved full tensor (PEFT's base_layer copies included)
                module, suffix = name.replace(".base_layer.", ".").rsplit(".", 1)
                replaced[self._base_name(module, suffix)] = tensor
                continue
            module = ".".join(parts[:parts.index(factor)])
            slot, kind = _FACTOR_KEYS[factor]
            entry = modules.setdefault(module, LoraModule(module, kind=kind))
            setattr(entry, slot.lower(), tensor)
        by_parameter = {}
        for module, entry in modules.items():
            self._complete(entry)
            by_parameter[self._base_name(module)] = entry
        return by_parameter, replaced

    def _complete(self, entry: LoraModule) -> None:
        """Check one module's factors against the config and the base; set its scaling."""
        missing = "lora_B" if entry.b is None else "lora_A" if entry.a is None else None
        if missing:
            raise AceMergeError(f"{self.label}: module '{entry.module}' has no {missing}")
        assert entry.a is not None and entry.b is not None
        rank = entry.a.shape[0]
        config = self.adapter_config
        if entry.b.shape[1] != rank:
            raise AceMergeError(f"{self.label}: module '{entry.module}': lora_A has rank "
                                f"{rank}, lora_B {entry.b.shape[1]}")
        if rank != config["r"] and not _pattern_covers(config.get("rank_pattern"),
                                                        entry.module):
            raise AceMergeError(f"{self.label}: module '{entry.module}' has rank {rank}, "
                                f"the config says r = {config['r']}")
        alpha = float(config.get("lora_alpha", 8))
        entry.scale = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        entry.transpose = entry.kind == "embedding" or bool(config.get("fan_in_fan_out"))
        base_name = self._base_name(entry.module)
        shape = tuple(self.base.specs()[base_name][0])
        product = (entry.b.shape[0], entry.a.shape[1])
        if (product[::-1] if entry.transpose else product) != shape:
            raise AceMergeError(f"{self.label}: module '{entry.module}' gives a "
                                f"{product[0]}x{product[1]} update, the base's '{base_name}' "
                                f"is {'x'.join(map(str, shape))} (another base?)")

    # -- the Checkpoint interface

    def specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return self.base.specs()

    def _load(self, name: str) -> torch.Tensor:
        base = self.base.get(name)
        return (base.to(torch.float32) + self.task_vector(name, base.to(torch.float32))
                ).to(base.dtype)

    def task_vector(self, name: str, base: torch.Tensor) -> torch.Tensor:
        """The exact update of parameter ``name`` in ``base``'s dtype and device: a saved
        full tensor's difference to the base, plus the LoRA product of a targeted module."""
        update = (self.replaced[name].to(device=base.device, dtype=base.dtype) - base
                  if name in self.replaced else torch.zeros_like(base))
        module = self.modules.get(name)
        return update if module is None else update + module.delta(base.dtype, base.device)


    def factored_update(self, name: str, base: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The update of ``name`` as (left, right) in the stored layout: rank 0 where the
        adapter does not touch it; None where it replaces the tensor (no factors)."""
        if name in self.replaced or base.dim() != 2:
            return None
        module = self.modules.get(name)
        if module is None:
            rows, cols = base.shape
            return base.new_zeros(rows, 0), base.new_zeros(0, cols)
        return module.factors(base.dtype, base.device)


def _pattern_covers(pattern: dict | None, module: str) -> bool:
    """Whether PEFT's ``rank_pattern`` names this module (its keys match name suffixes)."""
    return any(module == key or module.endswith("." + key) for key in (pattern or {}))


def open_expert(source: str, base: Checkpoint, allow_base_mismatch: bool = False
                ) -> Checkpoint:
    """An expert: a full checkpoint, or a LoRA adapter folder (local or a hub id) on ``base``."""
    path = Path(source).expanduser()
    if is_adapter_folder(path):
        return LoraExpert(path, base, source, allow_base_mismatch)
    if looks_like_hub_id(source):
        folder = download(source)
        if is_adapter_folder(folder):
            return LoraExpert(folder, base, source, allow_base_mismatch)
        return open_folder(folder, label=source)
    return open_checkpoint(source)
