"""Per-task metrics on present labels only, vectorised in torch.

:func:`compute_metrics` returns exactly ``task.metrics`` for one task from raw model outputs (logits
for classification, standardised values for regression) and a present-label mask. Conventions:

- Everything is computed in float64 on the CPU; classification metrics work on logits directly
  (a logit ``>= 0`` is a predicted positive, i.e. probability ``>= 0.5``; log-losses use the stable
  log-sum-exp form), so no probability is ever clipped.
- ``auc`` is the Mann-Whitney statistic with average ranks for ties (equal to sklearn's
  ``roc_auc_score``); it is NaN when the present labels hold only one class. For multilabel tasks it is
  the mean over labels that have both classes among their present rows.
- ``macro_f1`` follows sklearn's ``f1_score(average="macro", labels=range(C), zero_division=0)``: a
  class never true and never predicted scores 0. Multilabel: binary F1 per label on that label's
  present rows, averaged over labels with at least one present row.
- Regression metrics are in original units (predictions decoded by :meth:`Task.decode`); ``r2`` is NaN
  when the present labels are constant.
- No present label at all, or a NaN prediction on a present row, gives NaN for every metric, never
  an exception: a diverged model is reported, not crashed on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from polytask.tasks import Task, TaskKind, missing_mask

__all__ = ["GLUE_METRIC_FNS", "compute_metrics", "evaluate_predictions", "glue_score", "primary_score"]

_NAN = float("nan")
_F64 = torch.float64


def compute_metrics(
    task: Task, pred: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None = None
) -> dict[str, float]:
    """Metrics ``task.metrics`` of raw predictions ``pred`` against labels ``y`` on rows where ``mask``.

    Layouts follow :mod:`polytask.tasks` (binary/regression ``(N,)`` or ``(N, 1)``, multiclass logits
    ``(N, C)`` with long labels ``(N,)``, multilabel ``(N, L)`` with a per-entry (or per-row) mask).
    ``mask=None`` derives the mask from NaN / -1 labels. Returns floats; NaN where a metric is undefined.
    """
    pred = torch.as_tensor(pred).detach().cpu()
    y = torch.as_tensor(y).detach().cpu()
    if mask is None:
        mask = missing_mask(y, task) if y.is_floating_point() else torch.ones(y.shape, dtype=torch.bool)
    mask = torch.as_tensor(mask).detach().cpu().to(torch.bool)
    kind = task.kind
    if kind in (TaskKind.BINARY, TaskKind.REGRESSION):
        pred, y, mask = _flat(pred, task, "prediction"), _flat(y, task, "label"), _flat(mask, task, "mask")
    else:
        if pred.dim() != 2 or pred.shape[1] != task.n_classes:
            raise ValueError(f"task '{task.name}': expected logits (N, {task.n_classes}), got {tuple(pred.shape)}")
        if kind is TaskKind.MULTICLASS:
            y, mask = _flat(y, task, "label"), _flat(mask, task, "mask")
        elif mask.dim() == 1:  # a row mask for a multilabel task applies to every label
            mask = mask[:, None].expand(y.shape)
    expected_y = pred.shape if kind is TaskKind.MULTILABEL else pred.shape[:1]
    if y.shape != expected_y or mask.shape != y.shape:
        raise ValueError(
            f"task '{task.name}': shapes disagree: prediction {tuple(pred.shape)}, label {tuple(y.shape)}, "
            f"mask {tuple(mask.shape)}"
        )

    nan_result = dict.fromkeys(task.metrics, _NAN)
    if not bool(mask.any()):
        return nan_result
    pred = pred.to(_F64)
    if bool(torch.isnan(pred[mask]).any()):  # rows (multiclass) or entries (other kinds) with a label
        return nan_result

    if kind is TaskKind.BINARY:
        out = _binary(task, pred[mask], y[mask].to(_F64))
    elif kind is TaskKind.MULTICLASS:
        out = _multiclass(task, pred[mask], y[mask])
    elif kind is TaskKind.MULTILABEL:
        out = _multilabel(task, pred, y.to(_F64), mask)
    else:
        out = _regression(task, pred[mask], y[mask].to(_F64))
    return {name: out[name] for name in task.metrics}


def evaluate_predictions(
    tasks: Sequence[Task] | Mapping[str, Task],
    preds: Mapping[str, torch.Tensor],
    y: Mapping[str, torch.Tensor],
    mask: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, dict[str, float]]:
    """``{task name: {metric: value}}`` for every task; dicts are keyed by task name.

    A task absent from ``mask`` (or ``mask=None``) gets its mask from NaN / -1 labels.
    """
    task_list = list(tasks.values()) if isinstance(tasks, Mapping) else list(tasks)
    out: dict[str, dict[str, float]] = {}
    for task in task_list:
        for what, d in (("predictions", preds), ("labels", y)):
            if task.name not in d:
                raise KeyError(f"task '{task.name}' has no {what}")
        m = None if mask is None else mask.get(task.name)
        out[task.name] = compute_metrics(task, preds[task.name], y[task.name], m)
    return out


def primary_score(tasks: Sequence[Task] | Mapping[str, Task], metrics: Mapping[str, Mapping[str, float]]) -> float:
    """Mean over tasks of each task's primary metric (all higher-is-better); NaNs ignored, all NaN -> NaN."""
    task_list = list(tasks.values()) if isinstance(tasks, Mapping) else list(tasks)
    values = []
    for task in task_list:
        if task.name not in metrics:
            raise KeyError(f"task '{task.name}' has no metrics")
        v = metrics[task.name].get(task.primary_metric, _NAN)
        if not math.isnan(v):
            values.append(v)
    return sum(values) / len(values) if values else _NAN


# --------------------------------------------------------------------------------- per kind
def _flat(t: torch.Tensor, task: Task, what: str) -> torch.Tensor:
    if t.dim() == 2 and t.shape[1] == 1:
        return t[:, 0]
    if t.dim() != 1:
        raise ValueError(f"task '{task.name}': expected a {what} of shape (N,) or (N, 1), got {tuple(t.shape)}")
    return t


def _check_binary_labels(task: Task, y: torch.Tensor) -> None:
    if not bool(((y == 0) | (y == 1)).all()):
        raise ValueError(f"task '{task.name}': {task.kind.value} labels must be 0/1 on present rows")


def _binary(task: Task, logit: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    _check_binary_labels(task, y)
    auc = _auc_columns(logit[None, :], y[None, :], torch.ones((1, y.shape[0]), dtype=torch.bool))
    return {
        "auc": auc[0].item(),
        "accuracy": ((logit >= 0).to(_F64) == y).to(_F64).mean().item(),
        "logloss": F.binary_cross_entropy_with_logits(logit, y).item(),
    }


def _multiclass(task: Task, logits: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    c = task.n_classes
    y = y.long() if not y.is_floating_point() else y.round().long()
    if bool(((y < 0) | (y >= c)).any()):
        raise ValueError(f"task '{task.name}': present labels must be class indices in [0, {c})")
    hat = logits.argmax(dim=1)
    hit = hat == y
    tp = torch.bincount(y[hit], minlength=c).to(_F64)
    denom = (torch.bincount(hat, minlength=c) + torch.bincount(y, minlength=c)).to(_F64)  # 2tp + fp + fn
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros((), dtype=_F64))
    return {
        "accuracy": hit.to(_F64).mean().item(),
        "macro_f1": f1.mean().item(),
        "logloss": F.cross_entropy(logits, y).item(),
    }


def _multilabel(task: Task, logits: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    safe_y = torch.where(mask, y, torch.zeros((), dtype=_F64))
    _check_binary_labels(task, safe_y)
    auc = _auc_columns(logits.T, safe_y.T, mask.T)
    pos_hat = (logits >= 0) & mask
    pos = (safe_y == 1) & mask
    tp = (pos_hat & pos).sum(0).to(_F64)
    denom = (pos_hat.sum(0) + pos.sum(0)).to(_F64)  # 2tp + fp + fn per label
    f1 = torch.where(denom > 0, 2 * tp / denom.clamp(min=1), torch.zeros((), dtype=_F64))
    has_rows = mask.any(dim=0)
    elem = F.binary_cross_entropy_with_logits(logits, safe_y, reduction="none")
    return {
        "auc": _nanmean(auc),
        "macro_f1": f1[has_rows].mean().item(),
        "logloss": (elem[mask].sum() / mask.sum()).item(),
    }


def _regression(task: Task, pred: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    err = task.decode(pred) - y
    ss_res = (err**2).sum()
    ss_tot = ((y - y.mean()) ** 2).sum()
    return {
        "rmse": (ss_res / y.numel()).sqrt().item(),
        "mae": err.abs().mean().item(),
        "r2": (1 - ss_res / ss_tot).item() if ss_tot.item() > 0 else _NAN,
    }


def _nanmean(v: torch.Tensor) -> float:
    ok = ~torch.isnan(v)
    return v[ok].mean().item() if bool(ok.any()) else _NAN


def _auc_columns(scores: torch.Tensor, y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """ROC AUC of each row of ``scores`` (L, N) against 0/1 ``y`` on entries where ``mask``; NaN if one class.

    Mann-Whitney: AUC = (R+ - n+(n+ + 1)/2) / (n+ n-), R+ the sum of the positives' ranks, ties averaged.
    Masked entries are sorted last (key +inf, present scores clamped to finite) so present ranks are 1..n.
    """
    n_lab, n = scores.shape
    big = torch.finfo(_F64).max
    keys = torch.where(mask, scores.to(_F64).clamp(-big, big), torch.full((), math.inf, dtype=_F64))
    sorted_keys, order = keys.sort(dim=1)
    ys = y.gather(1, order)
    ms = mask.gather(1, order)
    new_group = torch.ones_like(ms)
    new_group[:, 1:] = sorted_keys[:, 1:] != sorted_keys[:, :-1]
    gid = (new_group.cumsum(dim=1) - 1 + torch.arange(n_lab)[:, None] * n).flatten()
    pos = torch.arange(1, n + 1, dtype=_F64).expand(n_lab, n).flatten()
    rank_sum = torch.zeros(n_lab * n, dtype=_F64).index_add_(0, gid, pos)
    count = torch.zeros(n_lab * n, dtype=_F64).index_add_(0, gid, torch.ones_like(pos))
    rank = (rank_sum / count.clamp(min=1))[gid].view(n_lab, n)
    positive = ms & (ys == 1)
    n_pos = positive.sum(1).to(_F64)
    n_neg = (ms & (ys == 0)).sum(1).to(_F64)
    r_pos = torch.where(positive, rank, torch.zeros((), dtype=_F64)).sum(1)
    auc = (r_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg).clamp(min=1)
    return torch.where((n_pos > 0) & (n_neg > 0), auc, torch.full((), _NAN, dtype=_F64))


# --------------------------------------------------------------------------------- GLUE metrics
def _glue_arrays(pred: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pred = torch.as_tensor(pred).detach().cpu().to(_F64).reshape(-1)
    y = torch.as_tensor(y).detach().cpu().to(_F64).reshape(-1)
    if pred.shape != y.shape:
        raise ValueError(f"predictions {tuple(pred.shape)} and labels {tuple(y.shape)} differ in length")
    return pred, y


def _mcc(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Matthews correlation of 0/1 predictions (logit >= 0) against 0/1 labels; 0 when undefined (as sklearn)."""
    hat = pred >= 0
    pos = y == 1
    tp, tn = float((hat & pos).sum()), float((~hat & ~pos).sum())
    fp, fn = float((hat & ~pos).sum()), float((~hat & pos).sum())
    denom = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denom if denom > 0 else 0.0


def _f1(pred: torch.Tensor, y: torch.Tensor) -> float:
    """F1 of the positive class (logit >= 0 predicts positive); 0 when there is no positive at all."""
    hat = pred >= 0
    pos = y == 1
    tp = float((hat & pos).sum())
    denom = float(hat.sum() + pos.sum())
    return 2 * tp / denom if denom > 0 else 0.0


def _accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float(((pred >= 0).to(_F64) == y).to(_F64).mean())


def _pearson(pred: torch.Tensor, y: torch.Tensor) -> float:
    a, b = pred - pred.mean(), y - y.mean()
    denom = float((a.square().sum() * b.square().sum()).sqrt())
    return float((a * b).sum()) / denom if denom > 0 else _NAN


def _average_ranks(v: torch.Tensor) -> torch.Tensor:
    order = v.argsort()
    sorted_v = v[order]
    new_group = torch.ones(v.shape[0], dtype=torch.bool)
    new_group[1:] = sorted_v[1:] != sorted_v[:-1]
    gid = new_group.cumsum(0) - 1
    pos = torch.arange(1, v.shape[0] + 1, dtype=_F64)
    mean_rank = torch.zeros(int(gid[-1]) + 1, dtype=_F64).index_add_(0, gid, pos)
    mean_rank /= torch.bincount(gid).to(_F64)
    ranks = torch.empty_like(pos)
    ranks[order] = mean_rank[gid]
    return ranks


def _spearman(pred: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation of average ranks (ties share their mean rank, as scipy's spearmanr)."""
    return _pearson(_average_ranks(pred), _average_ranks(y))


# GLUE's official metrics on raw outputs: a logit for binary tasks, a value for regression (any affine
# standardisation of a regression output leaves both correlations unchanged, up to its sign).
GLUE_METRIC_FNS = {"mcc": _mcc, "f1": _f1, "accuracy": _accuracy, "pearson": _pearson, "spearman": _spearman}


def glue_score(metric: str, pred: torch.Tensor, y: torch.Tensor) -> float:
    """One GLUE metric (``mcc``, ``f1``, ``accuracy``, ``pearson``, ``spearman``) of ``pred`` against ``y``.

    Binary metrics read ``pred`` as logits (``>= 0`` predicts class 1) and ``y`` as 0/1 labels; NaN
    predictions give NaN. Correlations are NaN when either side is constant.
    """
    if metric not in GLUE_METRIC_FNS:
        raise ValueError(f"unknown GLUE metric '{metric}'; valid: {', '.join(GLUE_METRIC_FNS)}")
    p, t = _glue_arrays(pred, y)
    if p.numel() == 0 or bool(torch.isnan(p).any()):
        return _NAN
    return GLUE_METRIC_FNS[metric](p, t)
