"""Training: the loop, selection on validation, checkpoints and resume, and the run-level API."""

from polytask.train._checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from polytask.train._device import DEVICE_CHOICES, resolve_device
from polytask.train._run import LoadedRun, evaluate, fit, load_data, load_run, predict
from polytask.train._trainer import (
    FitResult,
    NonFiniteLossError,
    TrainConfig,
    Trainer,
    evaluate_model,
    predict_model,
)

__all__ = [
    "CheckpointError",
    "DEVICE_CHOICES",
    "FitResult",
    "LoadedRun",
    "NonFiniteLossError",
    "TrainConfig",
    "Trainer",
    "evaluate",
    "evaluate_model",
    "fit",
    "load_checkpoint",
    "load_data",
    "load_run",
    "predict",
    "predict_model",
    "resolve_device",
    "save_checkpoint",
]
