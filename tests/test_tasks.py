from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from polytask.tasks import Task, TaskKind, missing_mask, parse_task_spec

KINDS = [
    Task("b", TaskKind.BINARY),
    Task("m", TaskKind.MULTICLASS, n_classes=3),
    Task("l", TaskKind.MULTILABEL, n_classes=4),
    Task("r", TaskKind.REGRESSION, y_mean=2.0, y_std=3.0),
]


def _example(task: Task, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    if task.kind is TaskKind.BINARY:
        return torch.randn(n, generator=g), torch.randint(0, 2, (n,), generator=g).float()
    if task.kind is TaskKind.MULTICLASS:
        return torch.randn(n, 3, generator=g), torch.randint(0, 3, (n,), generator=g)
    if task.kind is TaskKind.MULTILABEL:
        return torch.randn(n, 4, generator=g), torch.randint(0, 2, (n, 4), generator=g).float()
    return torch.randn(n, generator=g), torch.randn(n, generator=g) * 3 + 2


def test_reference_losses() -> None:
    pred, y = _example(KINDS[0])
    assert KINDS[0].loss(pred, y).item() == pytest.approx(F.binary_cross_entropy_with_logits(pred, y).item())
    pred, y = _example(KINDS[1])
    assert KINDS[1].loss(pred, y).item() == pytest.approx(F.cross_entropy(pred, y).item())
    pred, y = _example(KINDS[3])
    # Regression is trained on standardised labels: (y - 2) / 3.
    assert KINDS[3].loss(pred, y).item() == pytest.approx(F.mse_loss(pred, (y - 2) / 3).item(), rel=1e-6)


@pytest.mark.parametrize("task", KINDS, ids=lambda t: t.kind.value)
def test_mask_equals_filtering(task: Task) -> None:
    pred, y = _example(task)
    mask = torch.tensor([True, False, True, True, False, True])
    if task.kind is TaskKind.MULTILABEL:
        mask = mask[:, None].expand(-1, 4)
        filtered = task.loss(pred[mask[:, 0]], y[mask[:, 0]])
    else:
        filtered = task.loss(pred[mask], y[mask])
    assert task.loss(pred, y, mask).item() == pytest.approx(filtered.item(), rel=1e-6)


@pytest.mark.parametrize("task", KINDS, ids=lambda t: t.kind.value)
def test_no_labels_gives_zero_loss_and_zero_gradient(task: Task) -> None:
    pred, y = _example(task)
    pred.requires_grad_(True)
    y = torch.full_like(y, float("nan")) if y.is_floating_point() else y
    mask = torch.zeros(y.shape, dtype=torch.bool)
    loss = task.loss(pred, y, mask)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(pred.grad, torch.zeros_like(pred))


def test_nan_and_minus_one_labels_are_missing() -> None:
    b = Task("b", "binary")
    y = torch.tensor([1.0, float("nan"), -1.0, 0.0])
    assert missing_mask(y, b).tolist() == [True, False, False, True]
    pred = torch.zeros(4, requires_grad=True)
    loss = b.loss(pred, y)  # mask derived from NaN / -1
    loss.backward()
    assert math.isfinite(loss.item()) and loss.item() == pytest.approx(math.log(2))
    assert pred.grad[1] == 0 and pred.grad[2] == 0
    r = Task("r", "regression")
    assert missing_mask(torch.tensor([-1.0, float("nan")]), r).tolist() == [True, False]


def test_decode_and_round_trip() -> None:
    r = KINDS[3]
    assert r.decode(torch.tensor([0.0, 1.0])).tolist() == [2.0, 5.0]
    assert torch.allclose(KINDS[1].decode(torch.zeros(2, 3)).sum(1), torch.ones(2))
    for t in KINDS:
        assert Task.from_dict(t.to_dict()) == t
    assert KINDS[0].out_dim == 1 and KINDS[1].out_dim == 3 and KINDS[2].out_dim == 4


def test_metric_directions_and_primary() -> None:
    assert KINDS[0].metrics == ("auc", "accuracy", "logloss")
    assert Task.higher_is_better("auc") and not Task.higher_is_better("rmse")
    assert all(Task.higher_is_better(t.primary_metric) for t in KINDS)


def test_parse_task_spec() -> None:
    assert parse_task_spec("income:binary") == ("income", TaskKind.BINARY, 0)
    assert parse_task_spec("digit:multiclass(10)") == ("digit", TaskKind.MULTICLASS, 10)
    assert parse_task_spec("age") == ("age", None, 0)
    with pytest.raises(ValueError, match="unknown kind 'binry'; valid kinds: binary"):
        parse_task_spec("income:binry")
    with pytest.raises(ValueError, match="has no name"):
        parse_task_spec(":binary")


def test_invalid_tasks() -> None:
    with pytest.raises(ValueError, match="task 'm': multiclass needs n_classes >= 2"):
        Task("m", "multiclass", n_classes=1)
    with pytest.raises(ValueError, match="y_std must be positive"):
        Task("r", "regression", y_std=0.0)
