from __future__ import annotations

import io
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import accuracy_score, f1_score, log_loss, mean_absolute_error, r2_score, roc_auc_score

from polytask.evaluate import (
    compute_metrics,
    delta_m,
    delta_p,
    evaluate_predictions,
    format_mean_std,
    mean_rank,
    mean_std,
    metrics_table,
    primary_score,
    print_table,
)
from polytask.tasks import Task

BIN = Task("click", "binary")
MC = Task("kind", "multiclass", n_classes=4)
ML = Task("tags", "multilabel", n_classes=5)
REG = Task("price", "regression", y_mean=10.0, y_std=3.0)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------------- Δm and Δp
def test_delta_m_delta_p_hand_computed_one_metric_per_task():
    mt = {"a": {"accuracy": 0.88}, "r": {"rmse": 2.5}}
    base = {"a": {"accuracy": 0.80}, "r": {"rmse": 2.0}}
    # accuracy (higher better): (0.88 - 0.80) / 0.80 = +0.10 -> Δm term -10, Δp term +10
    # rmse (lower better):      (2.5 - 2.0) / 2.0   = +0.25 -> Δm term +25, Δp term -25
    # Δm = (-10 + 25) / 2 = 7.5 ; Δp = (10 - 25) / 2 = -7.5
    assert delta_m(mt, base) == pytest.approx(7.5)
    assert delta_p(mt, base) == pytest.approx(-7.5)


def test_delta_m_and_delta_p_differ_with_unequal_metric_counts():
    mt = {"c": {"accuracy": 0.88, "logloss": 0.4, "macro_f1": 0.55}, "r": {"rmse": 2.5}}
    base = {"c": {"accuracy": 0.80, "logloss": 0.5, "macro_f1": 0.50}, "r": {"rmse": 2.0}}
    # Δm terms: accuracy -10, logloss (0.4-0.5)/0.5 = -0.2 -> -20, macro_f1 +0.1 -> -10, rmse +25
    # Δm = (-10 - 20 - 10 + 25) / 4 = -3.75   (multi-task "helped")
    # Δp: task c = (10 + 20 + 10) / 3 = 13.333..., task r = -25 ; Δp = (13.333... - 25) / 2 = -5.8333... ("hurt")
    assert delta_m(mt, base) == pytest.approx(-3.75)
    assert delta_p(mt, base) == pytest.approx((40 / 3 - 25) / 2)


def test_sign_conventions_improvement():
    base = {"a": {"auc": 0.80, "logloss": 0.50}, "r": {"rmse": 2.0, "r2": 0.5}}
    better = {"a": {"auc": 0.84, "logloss": 0.45}, "r": {"rmse": 1.8, "r2": 0.6}}
    assert delta_m(better, base) < 0 < delta_p(better, base)
    assert delta_m(base, base) == 0 == delta_p(base, base)
    # with one metric per task both are the same mean, up to sign
    one = {"a": ["auc"], "r": ["rmse"]}
    assert delta_p(better, base, metrics=one) == pytest.approx(-delta_m(better, base, metrics=one))
    # a negative baseline r2 improving still counts as an improvement (|M_b| in the denominator)
    assert delta_m({"r": {"r2": 0.1}}, {"r": {"r2": -0.5}}) == pytest.approx(-120.0)


def test_metric_and_task_selection():
    mt = {"a": {"auc": 0.9, "accuracy": 0.5}, "b": {"auc": 0.6, "rmse": 1.0}, "c": {"auc": 0.5}}
    base = {"a": {"auc": 0.8, "accuracy": 1.0}, "b": {"auc": 0.6, "rmse": 9.0}, "c": {"auc": 0.5}}
    # only AUC: a -> -12.5, b -> 0, c -> 0 ; Δm = -12.5 / 3
    assert delta_m(mt, base, metrics=["auc"]) == pytest.approx(-12.5 / 3)
    assert delta_m(mt, base, tasks=["a"], metrics=["auc"]) == pytest.approx(-12.5)
    assert delta_m(mt, base, metrics={"a": ["auc"]}) == pytest.approx(-12.5)  # the mapping picks the tasks
    # metrics present only on one side are left out by default
    assert delta_m({"a": {"auc": 0.9, "r2": 0.3}}, {"a": {"auc": 0.9}}) == 0.0
    # Task objects as keys or selectors
    t = Task("a", "binary")
    assert delta_m({t: {"auc": 0.9}}, {"a": {"auc": 0.8}}, tasks=[t]) == pytest.approx(-12.5)


def test_gain_errors():
    base = {"a": {"auc": 0.8}}
    with pytest.raises(ValueError, match="task 'b' is missing from the baseline"):
        delta_m({"a": {"auc": 0.9}, "b": {"auc": 0.9}}, base)
    with pytest.raises(ValueError, match="auc of task 'a' is 0"):
        delta_p({"a": {"auc": 0.9}}, {"a": {"auc": 0.0}})
    with pytest.raises(ValueError, match="auc of task 'a' is nan"):
        delta_m({"a": {"auc": float("nan")}}, base)
    with pytest.raises(ValueError, match="metric 'rmse' of task 'a' is missing"):
        delta_m({"a": {"auc": 0.9}}, base, metrics=["rmse"])
    with pytest.raises(ValueError, match="metric 'loss' has no known direction"):
        delta_m({"a": {"loss": 0.9}}, {"a": {"loss": 0.8}})
    with pytest.raises(ValueError, match="no metric is present"):
        delta_m({"a": {"rmse": 0.9}}, base)


def test_mean_rank_with_ties():
    results = {
        "A": {"t": {"accuracy": 0.9, "rmse": 1.0}},
        "B": {"t": {"accuracy": 0.9, "rmse": 2.0}},
        "C": {"t": {"accuracy": 0.8, "rmse": 0.5}},
    }
    # accuracy: A, B tie for 1st -> 1.5 each, C 3 ; rmse (lower better): C 1, A 2, B 3
    assert mean_rank(results) == pytest.approx({"A": 1.75, "B": 2.25, "C": 2.0})
    assert mean_rank(results, metrics=["accuracy"]) == pytest.approx({"A": 1.5, "B": 1.5, "C": 3.0})
    with pytest.raises(ValueError, match="task 't' is missing from the method 'D'"):
        mean_rank({**results, "D": {}})


# --------------------------------------------------------------------------------- metrics vs sklearn
def test_binary_matches_sklearn_with_ties():
    g = _gen(1)
    logit = (torch.randn(500, generator=g) * 2).round()  # many tied scores
    y = (torch.rand(500, generator=g) < 0.4).float()
    out = compute_metrics(BIN, logit, y, torch.ones(500, dtype=torch.bool))
    p = torch.sigmoid(logit.double()).numpy()
    assert out["auc"] == pytest.approx(roc_auc_score(y.numpy(), p), abs=1e-12)
    assert out["accuracy"] == pytest.approx(accuracy_score(y.numpy(), p >= 0.5))
    assert out["logloss"] == pytest.approx(log_loss(y.numpy(), p), rel=1e-9)
    assert list(out) == list(BIN.metrics)
    assert compute_metrics(BIN, logit[:, None], y[:, None], None) == out  # (N, 1) and mask from labels


def test_multiclass_matches_sklearn():
    g = _gen(2)
    logits = torch.randn(300, 4, generator=g)
    y = torch.randint(0, 3, (300,), generator=g)  # class 3 never true: still counted in macro F1 (as sklearn)
    out = compute_metrics(MC, logits, y, torch.ones(300, dtype=torch.bool))
    prob = torch.softmax(logits.double(), 1).numpy()
    hat = prob.argmax(1)
    assert out["accuracy"] == pytest.approx(accuracy_score(y, hat))
    assert out["macro_f1"] == pytest.approx(f1_score(y, hat, average="macro", labels=range(4), zero_division=0))
    assert out["logloss"] == pytest.approx(log_loss(y, prob, labels=range(4)), rel=1e-9)
    with pytest.raises(ValueError, match="class indices"):
        compute_metrics(MC, logits, torch.full((300,), 4), None)


def test_multilabel_per_label_masks_match_sklearn():
    g = _gen(3)
    n, n_lab = 200, 5
    logits = torch.randn(n, n_lab, generator=g)
    y = (torch.rand(n, n_lab, generator=g) < 0.5).float()
    mask = torch.rand(n, n_lab, generator=g) < 0.7
    y[:, 3] = 1.0  # label 3: one class only -> left out of AUC, kept in F1
    mask[:, 4] = False  # label 4: no labels at all -> left out of everything
    y[~mask] = float("nan")
    out = compute_metrics(ML, logits, y, mask)
    aucs, f1s, losses = [], [], []
    for j in range(n_lab):
        m = mask[:, j].numpy()
        if not m.any():
            continue
        yj, pj = y[m, j].numpy(), torch.sigmoid(logits[m, j].double()).numpy()
        if len(np.unique(yj)) == 2:
            aucs.append(roc_auc_score(yj, pj))
        f1s.append(f1_score(yj, pj >= 0.5, zero_division=0))
        losses += list(-(yj * np.log(pj) + (1 - yj) * np.log(1 - pj)))
    assert len(aucs) == 3 and len(f1s) == 4
    assert out["auc"] == pytest.approx(np.mean(aucs))
    assert out["macro_f1"] == pytest.approx(np.mean(f1s))
    assert out["logloss"] == pytest.approx(np.mean(losses))
    assert compute_metrics(ML, logits, y, None) == out  # NaN labels give the same mask
    rows = torch.rand(n, generator=g) < 0.5  # a row mask applies to every label
    assert compute_metrics(ML, logits, y.nan_to_num(0), rows) == compute_metrics(
        ML, logits, y.nan_to_num(0), rows[:, None].expand(n, n_lab)
    )
    with pytest.raises(ValueError, match="shapes disagree"):
        compute_metrics(ML, logits, y[:, :2], None)


def test_regression_in_original_units():
    g = _gen(4)
    y = 10 + 3 * torch.randn(400, generator=g)
    pred = torch.randn(400, generator=g)  # standardised model output
    out = compute_metrics(REG, pred, y, torch.ones(400, dtype=torch.bool))
    decoded = (pred.double() * 3 + 10).numpy()
    assert out["rmse"] == pytest.approx(math.sqrt(np.mean((decoded - y.double().numpy()) ** 2)))
    assert out["mae"] == pytest.approx(mean_absolute_error(y, decoded))
    assert out["r2"] == pytest.approx(r2_score(y, decoded))
    perfect = compute_metrics(REG, (y - 10) / 3, y, None)
    assert perfect["rmse"] == pytest.approx(0, abs=1e-5) and perfect["r2"] == pytest.approx(1)


@pytest.mark.parametrize("task", [BIN, MC, ML, REG], ids=lambda t: t.kind.value)
def test_mask_equals_filtered_rows_and_no_labels_is_nan(task):
    g = _gen(5)
    n = 120
    pred = torch.randn(n, generator=g) if task.out_dim == 1 else torch.randn(n, task.out_dim, generator=g)
    if task is MC:
        y = torch.randint(0, 4, (n,), generator=g)
    elif task is ML:
        y = (torch.rand(n, 5, generator=g) < 0.5).float()
    elif task is BIN:
        y = (torch.rand(n, generator=g) < 0.5).float()
    else:
        y = torch.randn(n, generator=g)
    rows = torch.rand(n, generator=g) < 0.6
    mask = rows[:, None].expand_as(y) if y.dim() == 2 else rows
    full = torch.ones_like(mask)
    masked = compute_metrics(task, pred, y, mask)
    filtered = compute_metrics(task, pred[rows], y[rows], full[rows])
    assert masked == pytest.approx(filtered)
    none = compute_metrics(task, pred, y, torch.zeros_like(mask))
    assert list(none) == list(task.metrics) and all(math.isnan(v) for v in none.values())


def test_degenerate_cases_give_nan_not_errors():
    y = torch.ones(10)
    out = compute_metrics(BIN, torch.randn(10), y, None)
    assert math.isnan(out["auc"]) and out["logloss"] > 0  # one class: AUC undefined
    assert math.isnan(compute_metrics(REG, torch.zeros(10), y, None)["r2"])  # constant labels
    bad = torch.randn(10)
    bad[3] = float("nan")
    assert all(math.isnan(v) for v in compute_metrics(BIN, bad, (torch.arange(10) % 2).float(), None).values())
    with pytest.raises(ValueError, match="0/1"):
        compute_metrics(BIN, torch.randn(10), torch.full((10,), 2.0), None)


def test_evaluate_predictions_and_primary_score():
    g = _gen(6)
    tasks = [BIN, REG]
    preds = {"click": torch.randn(50, generator=g), "price": torch.randn(50, generator=g)}
    ys = {"click": (torch.rand(50, generator=g) < 0.5).float(), "price": 10 + 3 * torch.randn(50, generator=g)}
    res = evaluate_predictions(tasks, preds, ys, {"click": torch.ones(50, dtype=torch.bool)})
    assert set(res) == {"click", "price"} and list(res["price"]) == ["rmse", "mae", "r2"]
    assert primary_score(tasks, res) == pytest.approx((res["click"]["auc"] + res["price"]["r2"]) / 2)
    nan = float("nan")
    assert primary_score(tasks, {"click": {"auc": 0.7}, "price": {"r2": nan}}) == pytest.approx(0.7)
    assert math.isnan(primary_score(tasks, {"click": {"auc": nan}, "price": {"r2": nan}}))


# --------------------------------------------------------------------------------- tables
def test_mean_std_and_format():
    m, s = mean_std([1.0, 2.0, 3.0])
    assert (m, s) == pytest.approx((2.0, 1.0))  # sample std (ddof=1)
    assert mean_std([0.5]) == (0.5, 0.0)
    assert format_mean_std(0.94123, 0.00118) == "0.9412 ± 0.0012"
    with pytest.raises(ValueError):
        mean_std([])


def test_metrics_table_markdown_and_print():
    rows = {
        "single-task": {"click": {"auc": 0.8, "logloss": 0.5}, "price": {"rmse": 2.0}},
        "mtl": {BIN: {"logloss": 0.45, "auc": (0.84, 0.01)}, "price": {"rmse": 1.8}},
    }
    gains = {"mtl": {"Δm%": -7.5, "Δp": 7.5}}
    text = metrics_table(rows, [BIN, "price"], gains)
    lines = text.splitlines()
    assert lines[0] == "| method | click/auc | click/logloss | price/rmse | Δm% | Δp |"
    assert lines[2] == "| single-task | 0.8000 | 0.5000 | 2.0000 | — | — |"
    assert lines[3] == "| mtl | 0.8400 ± 0.0100 | 0.4500 | 1.8000 | -7.50 | +7.50 |"
    buf = io.StringIO()
    print_table(rows, [BIN, "price"], gains, file=buf)
    assert buf.getvalue().strip() == text

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    print_table(rows, gains=gains, title="results", file=tty)
    assert "results" in tty.getvalue() and "0.8400 ± 0.0100" in tty.getvalue() and "|" not in tty.getvalue()
