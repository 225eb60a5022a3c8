"""Checkpoint readers: one interface over HF folders, single files, hub ids and dicts.

Every reader exposes the names, shapes and dtypes of its tensors without loading them,
and loads one tensor at a time. Safetensors files are opened per read, so the pages of
a memory map never accumulate across a merge; pickled files load with
``weights_only=True`` (memory-mapped where the format allows).
"""

from __future__ import annotations

import json
import os
import re
from abc import ABC, abstractmethod
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from acemerge.errors import AceMergeError

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_HUB_META = ["*.json", "*.txt", "*.model", "tokenizer*"]

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}


class Checkpoint(ABC):
    """A set of named tensors that can be read one at a time."""

    label: str
    folder: Path | None = None
    config: dict | None = None
    #: The files the tensors are read from (none for an in-memory state dict).
    files: tuple[Path, ...] = ()

    def sources(self) -> list[Path]:
        """The files and folder this checkpoint is read from (empty for memory)."""
        return [*([self.folder] if self.folder is not None else []), *self.files]

    def task_vector(self, name: str, base: torch.Tensor) -> torch.Tensor:
        """This checkpoint's parameter ``name`` minus ``base`` (the base's value, already in
        the compute dtype and device); adapters override it with their exact update."""
        return self.get(name).to(device=base.device, dtype=base.dtype) - base

    def factored_update(self, name: str, base: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The update of 2-D ``name`` as (left, right), left @ right = its task vector in the
        stored layout, when this checkpoint holds it in low-rank form (LoRA); else None."""
        return None

    @abstractmethod
    def specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Name -> (shape, dtype), in the checkpoint's order, without loading tensors."""

    @abstractmethod
    def _load(self, name: str) -> torch.Tensor:
        """Load one tensor."""

    def get(self, name: str) -> torch.Tensor:
        """Load one tensor; a clear error names the file and the parameter."""
        try:
            return self._load(name)
        except AceMergeError:
            raise
        except KeyError:
            raise AceMergeError(f"{self.label}: no parameter '{name}'") from None
        except Exception as exc:  # noqa: BLE001 - any read failure is bad input here
            raise AceMergeError(f"{self.label}: cannot read '{name}': {one_line(exc)}") from None

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor, loaded (a LoRA expert's: the base plus its exact update)."""
        return {name: self.get(name) for name in self.specs()}


class StateDictCheckpoint(Checkpoint):
    """An in-memory state dict."""

    def __init__(self, tensors: dict[str, torch.Tensor], label: str = "state dict") -> None:
        bad = [k for k, v in tensors.items() if not isinstance(v, torch.Tensor)]
        if bad:
            raise AceMergeError(f"{label}: '{bad[0]}' is not a tensor")
        self.tensors, self.label = tensors, label

    def specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {k: (tuple(v.shape), v.dtype) for k, v in self.tensors.items()}

    def _load(self, name: str) -> torch.Tensor:
        return self.tensors[name]


class SafetensorsCheckpoint(Checkpoint):
    """One or more safetensors files (a sharded folder has an index)."""

    def __init__(self, files: list[Path], label: str, folder: Path | None = None) -> None:
        self.label, self.folder, self.files = label, folder, tuple(files)
        self._file_of: dict[str, Path] = {}
        self._specs: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for path in files:
            for name, spec in read_safetensors_header(path).items():
                self._file_of[name] = path
                self._specs[name] = spec

    def specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return dict(self._specs)

    def _load(self, name: str) -> torch.Tensor:
        path = self._file_of[name]
        with safe_open(path, framework="pt") as handle:
            return handle.get_tensor(name)


class TorchFileCheckpoint(Checkpoint):
    """Pickled PyTorch state dicts (``.bin``/``.pt``), loaded with ``weights_only=True``."""

    def __init__(self, files: list[Path], label: str, folder: Path | None = None) -> None:
        self.label, self.folder, self.files = label, folder, tuple(files)
        self.tensors: dict[str, torch.Tensor] = {}
        for path in files:
            self.tensors.update(load_torch_state_dict(path))

    def specs(self) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {k: (tuple(v.shape), v.dtype) for k, v in self.tensors.items()}

    def _load(self, name: str) -> torch.Tensor:
        return self.tensors[name]


def read_safetensors_header(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes of a safetensors file, validated by the library."""
    try:
        with safe_open(path, framework="pt") as handle:
            names = list(handle.keys())
            slices = {name: handle.get_slice(name) for name in names}
            specs = {
                name: (tuple(s.get_shape()), _SAFETENSORS_DTYPES.get(s.get_dtype()))
                for name, s in slices.items()
            }
    except (SafetensorError, OSError, ValueError) as exc:
        raise AceMergeError(f"{path}: not a valid safetensors file ({one_line(exc)})") from None
    unknown = [n for n, (_, dtype) in specs.items() if dtype is None]
    if unknown:
        raise AceMergeError(f"{path}: unsupported dtype for '{unknown[0]}'")
    return specs


def load_torch_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A pickled state dict, loaded safely; nested ``state_dict``/``model`` keys unwrapped."""
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):  # legacy (non-zip) format cannot be memory-mapped
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling failures come in many types
        raise AceMergeError(f"{path}: not a PyTorch checkpoint ({one_line(exc)})") from None
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj:
        raise AceMergeError(f"{path}: not a state dict of tensors")
    bad = [k for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise AceMergeError(f"{path}: entry '{bad[0]}' is not a tensor")
    return obj


def looks_like_hub_id(text: str) -> bool:
    """A name that is not an existing path and could be a Hub repository id."""
    return (not Path(text).expanduser().exists() and not text.startswith((".", "/", "~"))
            and _HUB_ID.match(text) is not None)


def open_checkpoint(source: str | os.PathLike | dict) -> Checkpoint:
    """Open a checkpoint: a state dict, a folder, a file, or a Hugging Face Hub id."""
    if isinstance(source, dict):
        return StateDictCheckpoint(source)
    text = str(source)
    path = Path(text).expanduser()
    if path.is_dir():
        return open_folder(path)
    if path.is_file():
        return _open_file(path)
    if looks_like_hub_id(text):  # e.g. gpt2, org/name
        return open_folder(download(text), label=text)
    raise AceMergeError(f"{text}: no such file or folder")


def _open_file(path: Path, folder: Path | None = None) -> Checkpoint:
    if path.suffix == ".safetensors":
        return SafetensorsCheckpoint([path], label=str(path), folder=folder)
    if path.suffix in TORCH_SUFFIXES:
        return TorchFileCheckpoint([path], label=str(path), folder=folder)
    raise AceMergeError(
        f"{path}: not a checkpoint (expected .safetensors, .bin, .pt or a model folder)"
    )


def open_folder(folder: Path, label: str | None = None) -> Checkpoint:
    """A Hugging Face model folder (safetensors or pickled, sharded or not)."""
    label = label or str(folder)
    if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
        raise AceMergeError(f"{label}: a LoRA adapter, not a full model: give it as an "
                            "expert, with its base as --base")
    config = _read_config(folder)
    checkpoint: Checkpoint
    if (folder / SAFETENSORS_INDEX).is_file():
        files = _index_files(folder, SAFETENSORS_INDEX)
        checkpoint = SafetensorsCheckpoint(files, label=label, folder=folder)
    elif (folder / "model.safetensors").is_file():
        checkpoint = SafetensorsCheckpoint([folder / "model.safetensors"], label, folder)
    elif (folder / BIN_INDEX).is_file():
        checkpoint = TorchFileCheckpoint(_index_files(folder, BIN_INDEX), label, folder)
    elif (folder / "pytorch_model.bin").is_file():
        checkpoint = TorchFileCheckpoint([folder / "pytorch_model.bin"], label, folder)
    else:
        singles = sorted(folder.glob("*.safetensors"))
        if len(singles) != 1:
            raise AceMergeError(
                f"{folder}: no checkpoint found (expected model.safetensors, "
                f"{SAFETENSORS_INDEX}, pytorch_model.bin or {BIN_INDEX})"
            )
        checkpoint = SafetensorsCheckpoint(singles, label, folder)
    checkpoint.config = config
    return checkpoint


def _read_config(folder: Path) -> dict | None:
    path = folder / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AceMergeError(f"{path}: invalid JSON ({one_line(exc)})") from None


def _index_files(folder: Path, index_name: str) -> list[Path]:
    index_path = folder / index_name
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise AceMergeError(f"{index_path}: invalid index ({one_line(exc)})") from None
    files = [folder / name for name in dict.fromkeys(weight_map.values())]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise AceMergeError(f"{index_path}: shard {missing[0].name} is missing")
    return files


def download(repo_id: str) -> Path:
    """Resolve a hub id through huggingface_hub (honours HF_HUB_OFFLINE and the cache)."""
    from huggingface_hub import snapshot_download

    try:
        folder = Path(snapshot_download(repo_id, allow_patterns=[*_HUB_META, "*.safetensors"]))
        if not any(folder.glob("*.safetensors")):  # an older repo with pickled weights only
            folder = Path(snapshot_download(repo_id, allow_patterns=[*_HUB_META, "*.bin"]))
        return folder
    except Exception as exc:  # noqa: BLE001 - offline, missing, gated, network...
        raise AceMergeError(
            f"{repo_id}: not a local path, and the Hugging Face Hub could not provide it "
            f"({one_line(exc)})"
        ) from None


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:197] + "..."
