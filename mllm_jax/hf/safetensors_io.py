"""Reading and writing Hugging Face safetensors checkpoints without torch and without loading whole files.

The safetensors format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}
and the raw little-endian tensor bytes. We memory-map the file and view each tensor in place, so a tensor is read from
disk only when (and as far as) it is sliced, bf16 included (ml_dtypes). A sharded checkpoint is an index json mapping
each tensor to one of several files.
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

_DTYPES = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_NAMES = {v: k for k, v in _DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class MissingFileError(ValueError, FileNotFoundError):
    """A file the checkpoint needs is not there (a ValueError, per the project's error rule, and a FileNotFoundError)."""


def _read_header(path: str) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


class SafetensorsFile:
    """One .safetensors file, memory-mapped; ``get(name)`` is a zero-copy numpy view."""

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise MissingFileError(f"safetensors file not found: {path}")
        self.path = path
        self.header, self._data_start = _read_header(path)
        self._mmap = None

    def keys(self):
        return self.header.keys()

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        info = self.header[name]
        if info["dtype"] not in _DTYPES:
            raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']!r}")
        if self._mmap is None:
            self._mmap = np.memmap(self.path, dtype=np.uint8, mode="r")
        begin, end = info["data_offsets"]
        raw = self._mmap[self._data_start + begin : self._data_start + end]
        return raw.view(_DTYPES[info["dtype"]]).reshape(info["shape"])


class CheckpointReader:
    """All tensors of a HF checkpoint directory (single file or sharded with an index), by name."""

    def __init__(self, directory: str):
        self.directory = directory
        index_path = os.path.join(directory, INDEX_FILE)
        single_path = os.path.join(directory, SINGLE_FILE)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            files = {fn: SafetensorsFile(os.path.join(directory, fn)) for fn in sorted(set(weight_map.values()))}
            self._where = {name: files[fn] for name, fn in weight_map.items()}
        elif os.path.isfile(single_path):
            file = SafetensorsFile(single_path)
            self._where = {name: file for name in file.keys()}
        else:
            raise MissingFileError(
                f"no safetensors weights in {directory}: expected {single_path} or {index_path} "
                "(PyTorch .bin checkpoints are not read; re-save them with safe_serialization=True)"
            )

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def shape(self, name: str) -> tuple[int, ...]:
        return self._file(name).shape(name)

    def get(self, name: str) -> np.ndarray:
        return self._file(name).get(name)

    def _file(self, name: str) -> SafetensorsFile:
        if name not in self._where:
            raise ValueError(f"tensor {name!r} is not in the checkpoint at {self.directory}")
        return self._where[name]


def _serialize(tensors: dict[str, np.ndarray]) -> tuple[bytes, list[np.ndarray]]:
    header, offset, chunks = {}, 0, []
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name])
        if a.dtype not in _NAMES:
            raise ValueError(f"tensor {name!r}: dtype {a.dtype} cannot be written to safetensors")
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
        chunks.append(a)
    header["__metadata__"] = {"format": "pt"}  # transformers refuses files without it
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # align the data section to 8 bytes
    return struct.pack("<Q", len(blob)) + blob, chunks


def write_file(path: str, tensors: dict[str, np.ndarray]) -> None:
    head, chunks = _serialize(tensors)
    with open(path, "wb") as f:
        f.write(head)
        for a in chunks:
            f.write(a.tobytes())


def write_checkpoint(directory: str, tensors: dict[str, np.ndarray], *, max_shard_bytes: int | None = None) -> None:
    """model.safetensors, or model-0000i-of-0000n.safetensors + index when the tensors exceed max_shard_bytes."""
    os.makedirs(directory, exist_ok=True)
    total = sum(np.asarray(a).nbytes for a in tensors.values())
    if max_shard_bytes is None or total <= max_shard_bytes:
        write_file(os.path.join(directory, SINGLE_FILE), tensors)
        return
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = np.asarray(tensors[name]).nbytes
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards):
        fn = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        write_file(os.path.join(directory, fn), shard)
        weight_map.update({name: fn for name in shard})
    with open(os.path.join(directory, INDEX_FILE), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
