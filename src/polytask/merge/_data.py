"""Task data for data-driven merge methods: input batches per task and a way to run any weights.

A :class:`MergeData` pairs a *skeleton* module (whose parameter names are the keys of the state dicts
being merged, e.g. a Hugging Face encoder) with one :class:`TaskData` per fine-tuned model, in the
order of the models: task ``k``'s batches are the data of model ``k``. A method runs the skeleton
with any weights through ``torch.func.functional_call`` (the skeleton's own weights are never
changed; its parameters are frozen with ``requires_grad=False`` and it is put in eval mode), turns
the output into task ``k``'s prediction with that task's fixed head, and, where the batches are
labelled, scores it with the task's loss.

``merge_data_from_config`` builds one from the ``data:`` mapping of a ``polytask merge`` YAML file::

    data:
      glue: [cola, sst2, mrpc, rte, stsb]   # one GLUE task per model, in the order of `models`
      heads: [heads/cola.safetensors, ...]  # each task's head (TaskHead tensors: out.weight, out.bias)
      split: train          # rows to draw from (train or dev); default train
      examples: 128         # rows per task, drawn at random with `seed`; default 128
      seed: 0
      batch_size: 16
      max_length: 128
      labeled: true         # false: only inputs reach the method (e.g. AdaMerging)
      encoder: null         # Hugging Face folder of skeleton + tokenizer; default all-MiniLM-L6-v2

Paths are relative to the YAML file's folder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polytask.tasks import Task, TaskKind

__all__ = [
    "MergeData",
    "TaskData",
    "check_models",
    "float_keys",
    "merge_data_from_config",
    "prediction_entropy",
]

Inputs = torch.Tensor | Mapping[str, torch.Tensor]
Batch = tuple[Inputs, torch.Tensor | None]
Features = Callable[[nn.Module, Mapping[str, torch.Tensor], Inputs], torch.Tensor]


def _default_features(module: nn.Module, params: Mapping[str, torch.Tensor], x: Inputs) -> torch.Tensor:
    if isinstance(x, Mapping):
        return torch.func.functional_call(module, dict(params), args=(), kwargs=dict(x), strict=False)
    return torch.func.functional_call(module, dict(params), (x,), strict=False)


@dataclass
class TaskData:
    """One task's data: ``(inputs, labels or None)`` batches, its head, and its :class:`Task` (for losses).

    ``head`` maps the skeleton's output to the task's prediction (identity when the skeleton already
    ends in the task's output); it is never merged or trained.
    """

    name: str
    batches: Sequence[Batch]
    head: Callable[[torch.Tensor], torch.Tensor] | None = None
    task: Task | None = None

    def __post_init__(self) -> None:
        if len(self.batches) == 0:
            raise ValueError(f"task '{self.name}': no data batches; give at least one batch of inputs")

    @property
    def labeled(self) -> bool:
        return all(y is not None for _, y in self.batches)


class MergeData:
    """The data a data-driven method sees: a skeleton module and one :class:`TaskData` per model.

    Args:
        module: runs the weights being merged; its parameter names are the state-dict keys.
        tasks: one per fine-tuned model, in the models' order.
        features: ``(module, params, x) -> output``; default ``functional_call(module, params, x)``
            (keyword arguments when ``x`` is a mapping). Text encoders pass mean pooling here.
    """

    def __init__(self, module: nn.Module, tasks: Sequence[TaskData], features: Features | None = None) -> None:
        names = [t.name for t in tasks]
        if not names:
            raise ValueError("merge data needs at least one task")
        if len(set(names)) != len(names):
            raise ValueError(f"merge data task names must be unique, got {names}")
        self.module = module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)  # gradients flow to the weights being merged, never to the skeleton
        self.tasks = list(tasks)
        self.features = features or _default_features

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def __len__(self) -> int:
        return len(self.tasks)

    def parameter_names(self) -> set[str]:
        return {n for n, _ in self.module.named_parameters()}

    def predict(self, params: Mapping[str, torch.Tensor], k: int, x: Inputs) -> torch.Tensor:
        """Task ``k``'s prediction on inputs ``x`` with the skeleton run by ``params``."""
        out = self.features(self.module, params, x)
        head = self.tasks[k].head
        return out if head is None else head(out)

    def loss(self, params: Mapping[str, torch.Tensor], k: int, batch: Batch) -> torch.Tensor:
        """Task ``k``'s supervised loss on a labelled batch (its :meth:`Task.loss`)."""
        td = self.tasks[k]
        x, y = batch
        if y is None or td.task is None:
            raise ValueError(f"task '{td.name}': a supervised objective needs labelled batches and a Task")
        return td.task.loss(self.predict(params, k, x), y)

    def entropy(self, params: Mapping[str, torch.Tensor], k: int, x: Inputs) -> torch.Tensor | None:
        """Mean prediction entropy of task ``k`` on ``x``; ``None`` for regression (no distribution)."""
        return prediction_entropy(self.predict(params, k, x), self.tasks[k].task)

    def cycle(self, k: int) -> Iterator[Batch]:
        """Task ``k``'s batches, round and round."""
        while True:
            yield from self.tasks[k].batches


def prediction_entropy(pred: torch.Tensor, task: Task | None = None) -> torch.Tensor | None:
    """Mean entropy of the predictive distribution (nats): softmax over ``(N, C)`` logits, Bernoulli
    for binary ``(N,)`` logits (summed over labels for multilabel); ``None`` for regression."""
    kind = task.kind if task is not None else (TaskKind.MULTICLASS if pred.dim() == 2 else TaskKind.BINARY)
    if kind is TaskKind.REGRESSION:
        return None
    if kind is TaskKind.MULTICLASS:
        logp = torch.log_softmax(pred, dim=-1)
        return -(logp.exp() * logp).sum(-1).mean()
    z = pred.reshape(pred.shape[0], -1)
    p = torch.sigmoid(z)
    # -p log p - (1-p) log(1-p) with logsigmoid, finite for any logit
    ent = -(p * nn.functional.logsigmoid(z) + (1 - p) * nn.functional.logsigmoid(-z))
    return ent.sum(-1).mean()


def float_keys(base: Mapping[str, torch.Tensor]) -> list[str]:
    """Keys of floating-point tensors (the ones any method combines; integer buffers stay the base's)."""
    return [k for k, v in base.items() if v.is_floating_point()]


def check_models(
    base: Mapping[str, torch.Tensor],
    models: Sequence[Mapping[str, torch.Tensor]],
    data: MergeData | None,
    method: str,
) -> MergeData:
    """One-line errors for a data-driven method called without data or with misaligned inputs."""
    if data is None:
        raise ValueError(
            f"merge method '{method}' is data-driven and needs task data: pass data=MergeData(...) "
            "(or a `data:` mapping in the merge config)"
        )
    if not isinstance(data, MergeData):
        raise TypeError(f"merge method '{method}': data must be a MergeData, got {type(data).__name__}")
    if not models:
        raise ValueError(f"merge method '{method}' needs at least one fine-tuned model")
    if len(models) != len(data):
        raise ValueError(
            f"merge method '{method}': {len(models)} models but data for {len(data)} tasks "
            f"({', '.join(data.task_names)}); give one task per model, in the same order"
        )
    keys = set(base)
    for i, m in enumerate(models):
        if set(m) != keys:
            diff = sorted(set(m) ^ keys)[:5]
            raise ValueError(f"merge method '{method}': model {i} and the base differ in keys, e.g. {diff}")
        for k in keys:
            if m[k].shape != base[k].shape:
                raise ValueError(
                    f"merge method '{method}': tensor '{k}' is {tuple(m[k].shape)} in model {i} "
                    f"but {tuple(base[k].shape)} in the base"
                )
    return data


# ------------------------------------------------------------------------------ from a YAML mapping
_CONFIG_KEYS = {"glue", "heads", "split", "examples", "seed", "batch_size", "max_length", "labeled", "encoder"}


def _positive_int(spec: Mapping[str, Any], key: str, default: int) -> int:
    value = spec.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"data: '{key}' must be a positive integer, got {value!r}")
    return value


def merge_data_from_config(spec: Mapping[str, Any], config_dir: Path) -> MergeData:
    """A :class:`MergeData` of GLUE tasks from a merge config's ``data:`` mapping (see the module doc)."""
    from polytask.data.glue import GLUE_TASKS, glue_task, read_glue
    from polytask.nn.heads import TaskHead
    from polytask.nn.text import load_text_encoder, pooled_features

    if not isinstance(spec, Mapping):
        raise ValueError(f"data: expected a mapping (glue: [...], heads: [...]), got {type(spec).__name__}")
    unknown = sorted(set(spec) - _CONFIG_KEYS)
    if unknown:
        raise ValueError(f"data: unknown key(s) {unknown}; valid: {', '.join(sorted(_CONFIG_KEYS))}")
    tasks = spec.get("glue")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise ValueError(f"data: 'glue' must list one GLUE task per model ({', '.join(GLUE_TASKS)}), got {tasks!r}")
    for t in tasks:
        if t not in GLUE_TASKS:
            raise ValueError(f"data: unknown GLUE task '{t}'; available: {', '.join(GLUE_TASKS)}")
    heads = spec.get("heads")
    if not isinstance(heads, list) or len(heads) != len(tasks):
        raise ValueError(f"data: 'heads' must list one head file per task ({len(tasks)}), got {heads!r}")
    split = spec.get("split", "train")
    if split not in ("train", "dev"):
        raise ValueError(f"data: 'split' must be 'train' or 'dev', got {split!r}")
    n = _positive_int(spec, "examples", 128)
    batch_size = _positive_int(spec, "batch_size", 16)
    max_length = _positive_int(spec, "max_length", 128)
    seed = int(spec.get("seed", 0))
    labeled = bool(spec.get("labeled", True))
    enc_path = spec.get("encoder")
    encoder, tokenizer = load_text_encoder(None if enc_path is None else Path(config_dir) / str(enc_path))
    hidden = int(encoder.config.hidden_size)

    from safetensors.torch import load_file

    out: list[TaskData] = []
    gen = torch.Generator().manual_seed(seed)
    for name, head_file in zip(tasks, heads, strict=True):
        path = Path(config_dir) / str(head_file)
        if not path.is_file():
            raise FileNotFoundError(f"data: head file for task '{name}' not found: {path}")
        train = read_glue(name, "train")
        task = glue_task(name, train.label)
        head = TaskHead(hidden, task)
        try:
            head.load_state_dict(load_file(str(path)))
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise ValueError(f"data: {path} is not a head for task '{name}' (hidden {hidden}): {first}") from None
        head.eval().requires_grad_(False)
        ex = train if split == "train" else read_glue(name, "dev")
        rows = torch.randperm(len(ex), generator=gen)[: min(n, len(ex))].tolist()
        ex = ex.take(rows)
        enc = tokenizer(ex.text_a, ex.text_b, padding="max_length", truncation=True, max_length=max_length)
        x_all = {k: torch.tensor(enc[k]) for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        y_all = torch.from_numpy(ex.label)
        batches: list[Batch] = []
        for s in range(0, len(rows), batch_size):
            xb = {k: v[s : s + batch_size] for k, v in x_all.items()}
            batches.append((xb, y_all[s : s + batch_size] if labeled else None))
        out.append(TaskData(name, batches, head, task))
    return MergeData(encoder, out, features=pooled_features)
