"""Where training runs: ``auto``, ``cpu``, ``cuda``, ``cuda:N`` or ``mps``, checked up front.

``auto`` takes the GPU when torch sees one and the CPU otherwise. Under torchrun a bare ``cuda``
(or ``auto`` on a GPU machine) means ``cuda:LOCAL_RANK``: one GPU per process, the layout nccl
expects. Apple's ``mps`` is used only when asked for, since some operations still lack kernels there.
"""

from __future__ import annotations

import os

import torch

__all__ = ["DEVICE_CHOICES", "resolve_device"]

DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"


def _local_rank() -> int | None:
    raw = os.environ.get("LOCAL_RANK")
    if raw is None:
        return None
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"LOCAL_RANK must be an integer, got '{raw}'") from None


def _cuda_problem() -> str | None:
    if torch.cuda.is_available():
        return None
    build = "a CPU-only torch build" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}"
    return f"torch sees no CUDA GPU ({build}, torch {torch.__version__})"


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """The :class:`torch.device` for ``spec``; a one-line ``ValueError`` when it cannot be used here."""
    if spec is None:
        spec = "auto"
    if isinstance(spec, torch.device):
        spec = str(spec)
    text = spec.strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return resolve_device("cuda")
        return torch.device("cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise ValueError(f"unknown device '{spec}'; valid: {DEVICE_CHOICES}") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "cuda":
        problem = _cuda_problem()
        if problem is not None:
            raise ValueError(f"device '{spec}' asked for, but {problem}; use --device cpu (or auto)")
        index = device.index
        if index is None:
            rank = _local_rank()
            index = rank if rank is not None else torch.cuda.current_device()
        count = torch.cuda.device_count()
        if index >= count:
            raise ValueError(
                f"device cuda:{index} does not exist: this machine has {count} CUDA device(s) (cuda:0 to "
                f"cuda:{count - 1}); under torchrun use at most {count} processes per node"
            )
        return torch.device("cuda", index)
    if device.type == "mps":
        if not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
            raise ValueError(f"device '{spec}' asked for, but torch sees no Apple MPS device; use --device cpu")
        return torch.device("mps")
    raise ValueError(f"unsupported device '{spec}'; valid: {DEVICE_CHOICES}")
