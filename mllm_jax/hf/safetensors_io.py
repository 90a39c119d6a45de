"""Reading and writing Hugging Face safetensors checkpoints without torch and without loading whole files.

The safetensors format is an 8-byte little-endian header length, a JSON header {name: {dtype, shape, data_offsets}}
and the raw little-endian tensor bytes. The header is validated when a file is opened (length within the file,
JSON object, known dtypes, data_offsets inside the data section and equal to dtype x shape, no overlaps), so a
corrupt or hostile file is a ValueError naming the file and the value, never a MemoryError or a wrong view. We
memory-map the file and view each tensor in place, so a tensor is read from
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


MAX_HEADER_BYTES = 100 * 2**20  # the safetensors reference reader's own limit


def _read_header(path: str) -> tuple[dict, int]:
    """The validated header and where the data starts. Every check names the file and the values: the header length
    against the file size, the JSON, each tensor's dtype, shape and data_offsets against the data section, and that
    no two tensors overlap."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: not a safetensors file: {size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > MAX_HEADER_BYTES:
            raise ValueError(f"{path}: not a safetensors file: header length {n} is larger than the file ({size} "
                             f"bytes) or the {MAX_HEADER_BYTES}-byte limit")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: safetensors header must be a JSON object; got {type(header).__name__}")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    spans = []
    for name, info in header.items():
        where = f"{path}: tensor {name!r}"
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
            raise ValueError(f"{where}: want {{dtype, shape, data_offsets}}; got {info!r}")
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _DTYPES:
            raise ValueError(f"{where}: unsupported dtype {dtype!r}; supported: {sorted(_DTYPES)}")
        if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise ValueError(f"{where}: shape must be a list of non-negative integers; got {shape!r}")
        if (not isinstance(offsets, list) or len(offsets) != 2 or not all(isinstance(o, int) for o in offsets)
                or not 0 <= offsets[0] <= offsets[1]):
            raise ValueError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end; got {offsets!r}")
        if offsets[1] > data_size:
            raise ValueError(f"{where}: data_offsets {offsets} run past the end of the data ({data_size} bytes; "
                             f"the file is truncated or the header is wrong)")
        need = _DTYPES[dtype].itemsize * int(np.prod(shape, dtype=np.int64))
        if offsets[1] - offsets[0] != need:
            raise ValueError(f"{where}: {dtype} {shape} needs {need} bytes but data_offsets {offsets} hold "
                             f"{offsets[1] - offsets[0]}")
        if need:
            spans.append((offsets[0], offsets[1], name))
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise ValueError(f"{path}: tensors {a!r} and {b!r} overlap in the data section")
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
        info = self.header[name]  # validated by _read_header: dtype known, offsets inside the file, sizes agree
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
