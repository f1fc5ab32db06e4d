"""Streaming tensor IO: memory-mapped safetensors sources and a streaming safetensors writer.

A model is a safetensors file, a Hugging Face model folder (``model.safetensors`` or a sharded
``model.safetensors.index.json``) or an in-memory state dict. File tensors come from
``safetensors.safe_open``, which maps the file: a tensor is read from the page cache when it is
used, so N models never sit in memory together. Pickle checkpoints (``pytorch_model.bin``, ``.pt``,
``.ckpt``) are refused: nothing is ever unpickled.

The writer knows every output name, dtype and shape up front, writes the safetensors header first
and then each tensor's bytes as it is produced, into a temp file (or temp folder) beside the
output that is renamed into place only when complete.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import struct
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

__all__ = [
    "DTYPES",
    "ModelSource",
    "OutputWriter",
    "open_model",
    "parse_dtype",
]

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
# Weight files never copied into an output folder (they are replaced by the merged weights).
_WEIGHT_SUFFIXES = (*PICKLE_SUFFIXES, ".safetensors", ".h5", ".msgpack", ".gguf")
_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float64": torch.float64,
    "fp64": torch.float64,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}

_ST_DTYPES: dict[torch.dtype, str] = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """``'bf16'`` / ``'bfloat16'`` / ``torch.bfloat16`` -> dtype; ``None`` or ``'auto'`` keeps each tensor's dtype."""
    if name is None or isinstance(name, torch.dtype):
        return name
    if str(name).lower() == "auto":
        return None
    try:
        return DTYPES[str(name).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype '{name}'; use one of: auto, {', '.join(DTYPES)}") from None


def _convert_hint(path: Path) -> str:
    return (
        f"{path} is a pickle checkpoint, which polytask never loads (unpickling runs arbitrary code); convert it "
        "to safetensors first, e.g. `AutoModel.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True)` "
        "or `safetensors.torch.save_file(state_dict, 'model.safetensors')` in a trusted environment"
    )


class ModelSource:
    """Aligned read access to one model's tensors: names, (shape, dtype) and the tensors themselves."""

    def __init__(self, label: str, folder: Path | None = None) -> None:
        self.label = label  # file path or "state dict #i", used in error messages
        self.folder = folder  # Hugging Face folder whose config/tokenizer files an output copies

    def names(self) -> list[str]:
        raise NotImplementedError

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        raise NotImplementedError

    def get(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def close(self) -> None:
        """Release file handles (maps stay valid while tensors reference them)."""


class StateDictSource(ModelSource):
    def __init__(self, sd: Mapping[str, torch.Tensor], label: str) -> None:
        super().__init__(label)
        for name, t in sd.items():
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{label}: entry '{name}' is a {type(t).__name__}, not a tensor")
        self._sd = sd

    def names(self) -> list[str]:
        return list(self._sd)

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        t = self._sd[name]
        return tuple(t.shape), t.dtype

    def get(self, name: str) -> torch.Tensor:
        return self._sd[name]


class SafetensorsSource(ModelSource):
    """One or several (sharded) safetensors files, memory-mapped.

    Each :meth:`get` maps the file anew and the map goes away with the tensor: pages already used
    leave the process, so its resident memory stays near one tensor per model (a handle held open
    for the whole merge would keep every page read so far mapped and resident).
    """

    def __init__(self, files: dict[str, Path], label: str, folder: Path | None) -> None:
        super().__init__(label, folder)
        if not files:
            raise ValueError(f"{label}: no tensors")
        self._where = dict(files)
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        for path in dict.fromkeys(files.values()):
            with _open_safetensors(path) as h:
                present = set(h.keys())
                for name in (n for n, p in files.items() if p == path):
                    if name not in present:
                        raise ValueError(f"{label}: tensor '{name}' listed in the index is missing from {path}")
                    sl = h.get_slice(name)
                    self._meta[name] = (tuple(sl.get_shape()), _dtype_of(sl.get_dtype(), path, name))

    def names(self) -> list[str]:
        return list(self._where)

    def meta(self, name: str) -> tuple[tuple[int, ...], torch.dtype]:
        return self._meta[name]

    def get(self, name: str) -> torch.Tensor:
        with _open_safetensors(self._where[name]) as h:
            return h.get_tensor(name)


def _open_safetensors(path: Path) -> Any:
    try:
        return safe_open(str(path), framework="pt")
    except FileNotFoundError:
        raise FileNotFoundError(f"model file {path} does not exist") from None
    except PermissionError:
        raise FileNotFoundError(f"model file {path} is not readable (permission denied)") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a valid safetensors file ({e})") from None


def _dtype_of(code: str, path: Path, name: str) -> torch.dtype:
    for dt, c in _ST_DTYPES.items():
        if c == code:
            return dt
    raise ValueError(f"{path}: tensor '{name}' has dtype {code}, which polytask cannot merge")


def _file_names(path: Path) -> list[str]:
    """Tensor names of a safetensors file, read from its header (no tensor is touched)."""
    with _open_safetensors(path) as f:
        return list(f.keys())


def _folder_files(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(f"{index} is not a safetensors index (needs a 'weight_map' object)") from None
        return {name: folder / shard for name, shard in weight_map.items()}
    single = folder / "model.safetensors"
    candidates = [single] if single.is_file() else sorted(folder.glob("*.safetensors"))
    if len(candidates) == 1:
        return dict.fromkeys(_file_names(candidates[0]), candidates[0])
    if len(candidates) > 1:
        raise ValueError(
            f"model folder {folder} has several safetensors files and no model.safetensors.index.json; "
            "name the file to merge"
        )
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ValueError(_convert_hint(pickles[0]))
    raise FileNotFoundError(f"model folder {folder} has no model.safetensors (nor a sharded index)")


def open_model(model: str | os.PathLike[str] | Mapping[str, torch.Tensor], label: str) -> ModelSource:
    """A :class:`ModelSource` for a safetensors file, a Hugging Face folder or an in-memory state dict."""
    if isinstance(model, Mapping):
        return StateDictSource(model, label)
    path = Path(model)
    if path.is_dir():
        return SafetensorsSource(_folder_files(path), str(path), path)
    if path.suffix in PICKLE_SUFFIXES and path.exists():
        raise ValueError(_convert_hint(path))
    if not path.exists():
        raise FileNotFoundError(f"model file {path} does not exist")
    if not os.access(path, os.R_OK):
        raise FileNotFoundError(f"model file {path} is not readable (permission denied)")
    try:
        return SafetensorsSource(dict.fromkeys(_file_names(path), path), str(path), None)
    except ValueError:
        if _looks_pickled(path):  # only now: a valid safetensors header may start with the same bytes
            raise ValueError(_convert_hint(path)) from None
        raise


def _looks_pickled(path: Path) -> bool:
    """torch.save files are zip archives (``PK\\x03\\x04``) or raw pickles (``\\x80`` + protocol)."""
    with open(path, "rb") as f:
        head = f.read(4)
    return head == b"PK\x03\x04" or head[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05")


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a contiguous CPU tensor, without a copy."""
    t = t.detach().contiguous()
    if t.dtype == torch.bool:
        t = t.view(torch.uint8)
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def _safetensors_header(entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]], metadata: dict[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, shape, dtype in entries:
        n = 1
        for s in shape:
            n *= s
        size = n * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # tensor data 8-byte aligned, as safetensors writes it
    return struct.pack("<Q", len(raw)) + raw


def _sync_file_range() -> Any:
    """Linux's ``sync_file_range`` (not in Python's os module), or None elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    return fn


_SYNC_RANGE = _sync_file_range()
_SYNC_WRITE = 2  # SYNC_FILE_RANGE_WRITE: start writeback of the range, do not wait for it
_SYNC_CHUNK = 8 << 20


class OutputWriter:
    """Write a safetensors file (or a Hugging Face folder holding ``model.safetensors``) as tensors arrive.

    ``entries`` fixes the order, names, shapes and dtypes. Output goes to a temp file/folder beside
    ``path`` and replaces it only on :meth:`commit`; :meth:`abort` (or an exception in a ``with``
    block) removes the temp, so a failed or killed merge never leaves a half-written output.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        entries: Sequence[tuple[str, tuple[int, ...], torch.dtype]],
        *,
        overwrite: bool = False,
        copy_from: Path | None = None,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        if self.path.exists() and not overwrite:
            raise FileExistsError(f"output {self.path} already exists; pass overwrite=True (--overwrite) to replace it")
        self.is_folder = self.path.suffix != ".safetensors"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._entries = list(entries)
        self._next = 0
        if self.is_folder:
            self._tmp = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent))
            file = self._tmp / "model.safetensors"
            if copy_from is not None:
                _copy_side_files(copy_from, self._tmp)
        else:
            fd, name = tempfile.mkstemp(prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            os.close(fd)
            self._tmp = Path(name)
            file = self._tmp
        self._f = open(file, "wb")
        self._f.write(_safetensors_header(self._entries, {"format": "pt", **(metadata or {})}))
        self._synced = 0  # bytes handed to the disk so far (see write)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        exp_name, shape, dtype = self._entries[self._next]
        if name != exp_name or tuple(tensor.shape) != shape or tensor.dtype != dtype:
            raise RuntimeError(
                f"writer expected {exp_name} {shape} {dtype}, got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        self._f.write(tensor_bytes(tensor))
        self._next += 1
        if _SYNC_RANGE is not None and self._f.tell() - self._synced >= _SYNC_CHUNK:
            # Start writing what we have to disk now, without waiting: the final fsync then only waits for
            # the rest, instead of the disk write of the whole file coming after the merge (Linux only).
            self._f.flush()
            end = self._f.tell()
            _SYNC_RANGE(self._f.fileno(), self._synced, end - self._synced, _SYNC_WRITE)
            self._synced = end

    def commit(self) -> Path:
        if self._next != len(self._entries):
            raise RuntimeError(f"writer got {self._next} of {len(self._entries)} tensors")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        if self.path.is_dir() and not self.path.is_symlink():
            # a folder cannot be replaced in one rename: move the old one aside, then drop it
            old = Path(tempfile.mkdtemp(prefix=f".{self.path.name}.", suffix=".old", dir=self.path.parent))
            os.replace(self.path, old / "x")
            os.replace(self._tmp, self.path)
            shutil.rmtree(old, ignore_errors=True)
            return self.path
        if self.is_folder and (self.path.exists() or self.path.is_symlink()):
            self.path.unlink()
        os.replace(self._tmp, self.path)
        return self.path

    def abort(self) -> None:
        if not self._f.closed:
            self._f.close()
        if self._tmp.is_dir():
            shutil.rmtree(self._tmp, ignore_errors=True)
        else:
            self._tmp.unlink(missing_ok=True)

    def __enter__(self) -> OutputWriter:
        return self

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        if exc_type is not None:
            self.abort()


def _copy_side_files(folder: Path, dest: Path) -> None:
    """Config, tokenizer and generation files of a Hugging Face folder, so the output loads in transformers."""
    for p in folder.iterdir():
        if p.is_file() and p.suffix not in _WEIGHT_SUFFIXES and p.name not in _WEIGHT_INDEXES:
            shutil.copy2(p, dest / p.name)


def iter_chunks(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(n, start + size))
