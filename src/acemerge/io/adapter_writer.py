"""A merge written as a PEFT LoRA adapter: each merged update factored by its SVD.

Per Linear / Conv1D weight with a nonzero update D (d_out x d_in in the module's frame),
D ~ U_k S_k V_k^T with k = ``out_rank``, or the numerical rank of D (``exact``: no loss
where the update is low-rank); lora_B = U_k S_k^(1/2), lora_A = S_k^(1/2) V_k^T. Embeddings
use lora_embedding_B / lora_embedding_A with B A = D^T, as PEFT does. ``lora_alpha`` equals
each module's rank (PEFT's scaling alpha / r = 1; per-module ranks in ``rank_pattern`` and
``alpha_pattern``). Other parameters with a nonzero update (heads, norms) go whole into
``modules_to_save`` with their module's other parameters; a module cannot be both.
The energy each module keeps, ||D_k||^2 / ||D||^2, is recorded for the model card.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import save_file

from acemerge.errors import AceMergeError
from acemerge.io.readers import Checkpoint
from acemerge.plan import ModuleKind, Plan

PEFT_PREFIX = "base_model.model."
FACTORED = (ModuleKind.LINEAR, ModuleKind.CONV1D, ModuleKind.EMBEDDING)


def factorize(update: torch.Tensor, rank: int | None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(B, A, energy kept) with B @ A the best rank-``rank`` approximation of ``update``
    (``None``: its numerical rank, torch.linalg.matrix_rank's tolerance)."""
    u, s, vh = torch.linalg.svd(update.double(), full_matrices=False)
    if rank is None:
        tolerance = float(s[0]) * max(update.shape) * torch.finfo(update.dtype).eps if len(s) \
            else 0.0
        rank = max(1, int((s > tolerance).sum()))
    rank = min(rank, len(s))
    root = s[:rank].sqrt()
    total = float(s.pow(2).sum())
    kept = float(s[:rank].pow(2).sum()) / total if total > 0 else 1.0
    return (u[:, :rank] * root).float(), (root[:, None] * vh[:rank]).float(), kept


class LoraAdapterWriter:
    """Collects the merged updates of a plan and writes a PEFT adapter folder."""

    def __init__(self, folder: Path, plan: Plan, base: Checkpoint, base_name: str,
                 out_rank: int | None) -> None:
        self.folder, self.base, self.base_name, self.out_rank = folder, base, base_name, out_rank
        self.entries = {e.name: e for e in plan.entries}
        self.tensors: dict[str, torch.Tensor] = {}
        self.ranks: dict[str, int] = {}
        self.energy: dict[str, float] = {}
        self.saved_modules: set[str] = set()
        self.updates: dict[str, torch.Tensor] = {}  # of parameters saved whole
        self.conv1d = False

    def add(self, name: str, update: torch.Tensor) -> None:
        """One parameter's merged update lam * D (stored layout)."""
        if not torch.any(update != 0):
            return
        entry = self.entries[name]
        module, leaf = name.rsplit(".", 1) if "." in name else ("", name)
        if entry.kind in FACTORED and update.dim() == 2 and leaf == "weight":
            self._factor(module, entry.kind, update)
        else:
            self.saved_modules.add(module)
            self.updates[name] = update

    def _factor(self, module: str, kind: ModuleKind, update: torch.Tensor) -> None:
        if kind is ModuleKind.CONV1D:
            frame, self.conv1d = update.T, True  # stored (d_in, d_out)
        else:
            frame = update.T if kind is ModuleKind.EMBEDDING else update
        b, a, kept = factorize(frame, self.out_rank)
        prefix = f"{PEFT_PREFIX}{module}."
        names = ("lora_embedding_B", "lora_embedding_A") if kind is ModuleKind.EMBEDDING \
            else ("lora_B.weight", "lora_A.weight")
        self.tensors[prefix + names[0]] = b.contiguous()
        self.tensors[prefix + names[1]] = a.contiguous()
        self.ranks[module], self.energy[module] = a.shape[0], kept

    def close(self) -> None:
        """Write ``adapter_model.safetensors`` and ``adapter_config.json``."""
        clash = sorted(self.saved_modules & set(self.ranks))
        if clash:
            raise AceMergeError(f"module '{clash[0]}' has both a weight update and an update "
                                "of another parameter; a LoRA adapter cannot hold both "
                                "(exclude the other parameter, or --out-format full)")
        if not self.ranks and not self.saved_modules:
            raise AceMergeError("the merged update is zero everywhere: no adapter to write")
        for name in self.entries:
            module = name.rsplit(".", 1)[0] if "." in name else ""
            if module in self.saved_modules:
                self.tensors[PEFT_PREFIX + name] = self._full_value(name)
        save_file(self.tensors, str(self.folder / "adapter_model.safetensors"),
                  metadata={"format": "pt"})
        (self.folder / "adapter_config.json").write_text(json.dumps(self.config(), indent=2))

    def _full_value(self, name: str) -> torch.Tensor:
        """Base + update of a parameter saved whole, in the base's dtype."""
        base = self.base.get(name)
        if name not in self.updates:
            return base.contiguous()
        return (base.to(self.updates[name].dtype) + self.updates[name]).to(base.dtype)

    def config(self) -> dict:
        """PEFT's LoraConfig fields for this adapter."""
        top = max(self.ranks.values(), default=1)
        pattern = {re.escape(m): r for m, r in self.ranks.items() if r != top}
        return {
            "peft_type": "LORA", "base_model_name_or_path": self.base_name, "r": top,
            "lora_alpha": top, "rank_pattern": pattern, "alpha_pattern": dict(pattern),
            "target_modules": sorted(self.ranks), "fan_in_fan_out": self.conv1d,
            "modules_to_save": sorted(self.saved_modules) or None, "lora_dropout": 0.0,
            "bias": "none", "use_rslora": False, "use_dora": False, "task_type": None,
            "inference_mode": True, "init_lora_weights": True,
        }
