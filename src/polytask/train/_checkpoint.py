"""Checkpoints: safetensors for tensors, JSON for everything else, written atomically.

A checkpoint named ``NAME`` in a folder is two files: ``NAME.json`` (format tag, metadata and the
sha256 of the tensor file it points to) and the tensor file it names. The tensor file's name carries
a serial number, and the JSON is renamed into place only after the tensor file is complete, so a
run killed at any instant leaves the previous checkpoint intact and consistent. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

__all__ = ["CheckpointError", "atomic_write_text", "load_checkpoint", "save_checkpoint"]

FORMAT = "polytask-checkpoint/1"


class CheckpointError(ValueError):
    """A checkpoint is missing, truncated, tampered with or of another format."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _fsync_replace(tmp: str, dest: Path) -> None:
    os.replace(tmp, dest)
    # Make the rename itself durable; a crash right after must not resurrect the old file.
    try:
        fd = os.open(dest.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path | str, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        _fsync_replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_checkpoint(folder: Path | str, name: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> Path:
    """Write ``tensors`` and ``meta`` as checkpoint ``name`` in ``folder``; returns the JSON path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / f"{name}.json"
    serial = 0
    old_file: Path | None = None
    if json_path.exists():
        try:
            old = json.loads(json_path.read_text())
            serial = int(old.get("serial", 0)) + 1
            old_file = folder / old["tensors"]
        except (ValueError, KeyError, TypeError):
            serial = 0
    tensor_name = f"{name}-{serial:06d}.safetensors"
    fd, tmp = tempfile.mkstemp(prefix=f".{tensor_name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        contiguous = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(contiguous, tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        _fsync_replace(tmp, folder / tensor_name)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    doc = {
        "format": FORMAT,
        "serial": serial,
        "tensors": tensor_name,
        "sha256": _sha256(folder / tensor_name),
        **meta,
    }
    atomic_write_text(json_path, json.dumps(doc, indent=1, sort_keys=False))
    if old_file is not None and old_file.name != tensor_name:
        old_file.unlink(missing_ok=True)
    return json_path


def load_checkpoint(json_path: Path | str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint, verifying format and the tensor file's sha256; one-line errors."""
    json_path = Path(json_path)
    if not json_path.exists():
        raise CheckpointError(f"checkpoint {json_path} does not exist; is this a polytask run directory?")
    try:
        meta = json.loads(json_path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {json_path} is not valid JSON ({e}); it is truncated or corrupted") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise CheckpointError(f"{json_path} is not a {FORMAT} checkpoint (format: {found!r})")
    tensor_path = json_path.parent / str(meta.get("tensors", ""))
    if not tensor_path.is_file():
        raise CheckpointError(f"checkpoint {json_path} points to missing tensor file {tensor_path}")
    actual = _sha256(tensor_path)
    if actual != meta.get("sha256"):
        raise CheckpointError(
            f"checkpoint tensor file {tensor_path} fails its sha256 check (expected {meta.get('sha256')}, "
            f"got {actual}): it was truncated or modified; restore it or retrain"
        )
    try:
        tensors = load_file(tensor_path)
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint tensor file {tensor_path} cannot be read: {e}") from e
    return tensors, meta
