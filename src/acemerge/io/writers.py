"""Writers: a streaming sharded-safetensors writer and the atomic output folder.

The ``safetensors`` library saves a whole dict of tensors held in memory; a streaming
merge must not hold a shard. The layout of every tensor (name, dtype, shape) is known
from the plan before the first tensor is merged, so each shard's header is written first
and tensor bytes follow as they are produced. The format (an 8-byte little-endian header
length, a JSON header with ``data_offsets``, then the raw bytes) is the library's; the
tests read every file we write back with the library itself.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import struct
import tempfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from acemerge.errors import AceMergeError

_DTYPE_NAMES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}
DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3


@dataclass(frozen=True)
class TensorSpec:
    """What will be written for one tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        n = torch.empty((), dtype=self.dtype).element_size()
        for size in self.shape:
            n *= size
        return n


def shard_layout(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split tensors, in order, into shards of at most ``max_shard_bytes`` (one tensor min)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def safetensors_header(specs: list[TensorSpec]) -> bytes:
    """The length-prefixed JSON header for tensors stored back to back in this order."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": _DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the library pads headers to 8 bytes
    return struct.pack("<Q", len(text)) + text


class ShardedSafetensorsWriter:
    """Writes tensors in a fixed order into ``model.safetensors`` or numbered shards."""

    def __init__(self, folder: Path, specs: list[TensorSpec], max_shard_bytes: int) -> None:
        self.folder = folder
        self.shards = shard_layout(specs, max_shard_bytes)
        count = len(self.shards)
        self.filenames = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        self._queue = [(i, spec) for i, shard in enumerate(self.shards) for spec in shard]
        self._next = 0
        self._shard = -1
        self._handle: BinaryIO | None = None

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor of the layout."""
        shard, spec = self._queue[self._next]
        if name != spec.name or tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
            raise AceMergeError(
                f"internal: expected {spec.name} {spec.shape} {spec.dtype}, got "
                f"{name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        if shard != self._shard:
            self._open_shard(shard)
        assert self._handle is not None
        data = tensor.detach().cpu().contiguous().reshape(-1)
        self._handle.write(memoryview(data.view(torch.uint8).numpy()))
        self._next += 1

    def _open_shard(self, shard: int) -> None:
        self._close_handle()
        self._shard = shard
        self._handle = open(self.folder / self.filenames[shard], "wb")  # noqa: SIM115
        self._handle.write(safetensors_header(self.shards[shard]))

    def _close_handle(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def close(self) -> None:
        """Finish the last shard and write the index of a sharded checkpoint."""
        self._close_handle()
        if self._next != len(self._queue):
            raise AceMergeError(f"internal: {len(self._queue) - self._next} tensors not written")
        if len(self.shards) > 1:
            weight_map = {
                spec.name: filename
                for filename, shard in zip(self.filenames, self.shards, strict=True)
                for spec in shard
            }
            total = sum(spec.nbytes for shard in self.shards for spec in shard)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def check_output_folder(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty existing output (unless ``overwrite``) before any work."""
    if out.exists() and not out.is_dir():
        raise AceMergeError(f"{out}: output exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise AceMergeError(f"{out}: output folder exists and is not empty (use --overwrite)")


def check_output_is_not_input(out: Path, inputs: Iterable[Path]) -> None:
    """Refuse an output that is, contains or lies inside an input, whatever the flags.

    Paths are compared after resolving symlinks and ``..``; ``--overwrite`` would otherwise
    delete the input, and a staging folder inside an input would write into it.
    """
    target = Path(out).expanduser().resolve()
    for source in inputs:
        resolved = Path(source).expanduser().resolve()
        if target == resolved:
            relation = "is"
        elif resolved.is_relative_to(target):
            relation = "contains"
        elif target.is_relative_to(resolved):
            relation = "lies inside"
        else:
            continue
        raise AceMergeError(f"{out}: the output {relation} the input {source}; "
                            "choose another output folder (inputs are never overwritten)")


@contextlib.contextmanager
def staged_output_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary folder beside ``out``, moved into place only when the block succeeds."""
    check_output_folder(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
