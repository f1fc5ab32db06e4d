"""polytask: multi-task learning, reported against single-task baselines."""

from polytask.tasks import Task, TaskKind

__version__ = "0.1.0"

__all__ = ["Task", "TaskKind", "__version__"]
