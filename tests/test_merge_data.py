"""Data-driven merge methods on tiny synthetic models: closed forms, defining properties, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from polytask.merge import DATA_DRIVEN, MERGE_METHODS, merge_state_dicts
from polytask.merge._data import MergeData, TaskData, check_models, prediction_entropy
from polytask.merge.adamerging import adamerging, learn_coefficients
from polytask.merge.atlas import atlas_coefficients
from polytask.merge.concrete import concrete_mask
from polytask.merge.fisher import diagonal_fisher, fisher_average, fisher_merging
from polytask.merge.map import map_front, map_merging, quadratic_features
from polytask.merge.regmean import regmean
from polytask.merge.twin_merging import TwinMerged, twin_merging
from polytask.tasks import Task, TaskKind

DATA_METHODS = ("fisher", "regmean", "adamerging", "atlas", "twin-merging", "concrete", "map")


def _sd(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _pool(n_tasks: int = 3, seed: int = 0, labels: bool = True, scale: float = 0.5):
    """A 2-layer trunk, ``n_tasks`` perturbed copies, 3-class heads and inputs from shifted Gaussians."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 6))
    base = _sd(trunk)
    models = [{k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n_tasks)]
    tasks = []
    for k in range(n_tasks):
        head = nn.Linear(6, 3)
        head.requires_grad_(False)
        batches = []
        for _ in range(2):
            x = torch.randn(16, 4, generator=g) + 3.0 * k  # separable inputs: a router can tell tasks apart
            with torch.no_grad():
                y = head(torch.func.functional_call(trunk, models[k], (x,))).argmax(-1)  # model k is right
            batches.append((x, y if labels else None))
        tasks.append(TaskData(f"t{k}", batches, head, Task(f"t{k}", TaskKind.MULTICLASS, n_classes=3)))
    return base, models, MergeData(trunk, tasks)


def _mean_entropy(data: MergeData, params: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        vals = [float(data.entropy(params, k, x)) for k, t in enumerate(data.tasks) for x, _ in t.batches]
    return float(np.mean(vals))


# ----------------------------------------------------------------------------- registry and errors
def test_methods_registered_as_data_driven_with_papers() -> None:
    assert set(DATA_METHODS) <= DATA_DRIVEN
    for name in DATA_METHODS:
        entry = MERGE_METHODS[name]
        assert any(str(y) in entry.paper for y in (2022, 2023, 2024)), entry.paper


@pytest.mark.parametrize("method", DATA_METHODS)
def test_data_driven_method_without_data_is_a_one_line_error(method: str) -> None:
    base, models, _ = _pool(2)
    fn = MERGE_METHODS[method].cls
    with pytest.raises(ValueError, match=rf"^merge method '{method}' is data-driven and needs task data") as err:
        fn(base, models, data=None)
    assert "\n" not in str(err.value)


def test_data_driven_through_merge_state_dicts_errors() -> None:
    base, models, data = _pool(2)
    with pytest.raises(ValueError, match="is data-driven"):
        merge_state_dicts("regmean", base, models)
    with pytest.raises(ValueError, match=r"merge method 'adamerging' has no parameter \['foo'\]; valid: "):
        merge_state_dicts("adamerging", base, models, data=data, foo=1)
    with pytest.raises(ValueError, match=r"^merge method 'regmean': 3 models but data for 2 tasks \(t0, t1\)"):
        check_models(base, [*models, models[0]], data, "regmean")
    with pytest.raises(ValueError, match="alpha must be in"):
        regmean(base, models, data=data, alpha=1.5)
    with pytest.raises(ValueError, match="granularity must be 'task' or 'layer'"):
        adamerging(base, models, data=data, granularity="block")


def test_supervised_objective_needs_labels() -> None:
    base, models, data = _pool(2, labels=False)
    with pytest.raises(ValueError, match=r"objective 'supervised' needs labelled batches .*\['t0', 't1'\]"):
        atlas_coefficients(base, models, data, objective="supervised", steps=1)


# ----------------------------------------------------------------------------- RegMean
def _linear_pool(same_inputs: bool):
    g = torch.Generator().manual_seed(1)
    lin = nn.Linear(5, 3)
    base = _sd(lin)
    models = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    shared_x = torch.randn(40, 5, generator=g)
    tasks = []
    for k in range(3):
        x = shared_x if same_inputs else torch.randn(30 + 10 * k, 5, generator=g) * (1 + k)
        tasks.append(TaskData(f"t{k}", [(x[:20], None), (x[20:], None)]))
    return base, models, MergeData(lin, tasks), tasks


@pytest.mark.parametrize("alpha", [1.0, 0.6])
def test_regmean_equals_the_closed_form_on_a_linear_layer(alpha: float) -> None:
    base, models, data, tasks = _linear_pool(same_inputs=False)
    merged = merge_state_dicts("regmean", base, models, data=data, alpha=alpha)
    grams = []
    for t in tasks:
        x = torch.cat([b[0] for b in t.batches]).double().numpy()
        g = x.T @ x / x.shape[0]
        grams.append(alpha * g + (1 - alpha) * np.diag(np.diag(g)))
    if alpha == 1.0:  # the least-squares problem itself: sum_k ||X_k W^T - X_k W_k^T||^2 / n_k
        rows, targets = [], []
        for t, m in zip(tasks, models, strict=True):
            x = torch.cat([b[0] for b in t.batches]).double().numpy() / np.sqrt(sum(len(b[0]) for b in t.batches))
            rows.append(x)
            targets.append(x @ m["weight"].double().numpy().T)
        expected = np.linalg.lstsq(np.concatenate(rows), np.concatenate(targets), rcond=None)[0].T
    else:
        num = sum(g @ m["weight"].double().numpy().T for g, m in zip(grams, models, strict=True))
        expected = np.linalg.solve(sum(grams), num).T
    np.testing.assert_allclose(merged["weight"].double().numpy(), expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(merged["bias"], sum(m["bias"] for m in models) / 3, atol=1e-6)  # non-linear: mean


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_regmean_reduces_to_averaging_when_grams_are_equal(alpha: float) -> None:
    base, models, data, _ = _linear_pool(same_inputs=True)
    merged = regmean(base, models, data=data, alpha=alpha)
    torch.testing.assert_close(merged["weight"], sum(m["weight"] for m in models) / 3, atol=1e-5, rtol=1e-5)


def test_regmean_second_layer_uses_each_models_own_activations() -> None:
    base, models, data = _pool(2)
    merged = regmean(base, models, data=data, alpha=1.0)
    grams = []
    for k, m in enumerate(models):
        x = torch.cat([b[0] for b in data.tasks[k].batches])
        h = torch.tanh(x @ m["0.weight"].T + m["0.bias"]).double()
        grams.append(h.T @ h / h.shape[0])
    num = sum(g @ m["2.weight"].double().T for g, m in zip(grams, models, strict=True))
    expected = torch.linalg.solve(sum(grams), num).T
    torch.testing.assert_close(merged["2.weight"].double(), expected, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- Fisher
def test_fisher_average_equal_fishers_is_the_average_and_weights_otherwise() -> None:
    base = {"w": torch.zeros(3)}
    models = [{"w": torch.tensor([1.0, 2.0, 3.0])}, {"w": torch.tensor([3.0, 6.0, -1.0])}]
    same = [{"w": torch.tensor([0.5, 2.0, 1.0])}] * 2
    torch.testing.assert_close(fisher_average(base, models, same, [1.0, 1.0], 1e-8)["w"], torch.tensor([2.0, 4.0, 1.0]))
    fishers = [{"w": torch.tensor([3.0, 1.0, 0.0])}, {"w": torch.tensor([1.0, 1.0, 0.0])}]
    out = fisher_average(base, models, fishers, [1.0, 1.0], 1e-8)["w"]
    # (3*1 + 1*3)/4 = 1.5; equal -> mean 4; both zero -> eps-weighted mean 1
    torch.testing.assert_close(out, torch.tensor([1.5, 4.0, 1.0]))


def test_diagonal_fisher_of_a_softmax_layer_matches_the_closed_form() -> None:
    # For logits W x: F[j, d] = mean_x p_j (1 - p_j) x_d^2 (the expectation over y ~ p(y|x)).
    g = torch.Generator().manual_seed(3)
    lin = nn.Linear(4, 3, bias=False)
    x = torch.randn(10, 4, generator=g)
    data = MergeData(lin, [TaskData("t", [(x[:6], None), (x[6:], None)], None, Task("t", "multiclass", n_classes=3))])
    params = {"weight": torch.randn(3, 4, generator=g)}
    f = diagonal_fisher(data, 0, params)["weight"]
    p = torch.softmax(x @ params["weight"].T, dim=-1)
    expected = ((p * (1 - p))[:, :, None] * x[:, None, :] ** 2).mean(0)
    torch.testing.assert_close(f, expected, atol=1e-6, rtol=1e-5)


def test_diagonal_fisher_of_a_binary_logit_matches_the_closed_form() -> None:
    g = torch.Generator().manual_seed(4)
    lin = nn.Linear(3, 1, bias=False)
    x = torch.randn(8, 3, generator=g)
    data = MergeData(lin, [TaskData("t", [(x, None)], lambda z: z[:, 0], Task("t", "binary"))])
    params = {"weight": torch.randn(1, 3, generator=g)}
    p = torch.sigmoid(x @ params["weight"][0])
    expected = ((p * (1 - p))[:, None] * x**2).mean(0)[None, :]
    torch.testing.assert_close(diagonal_fisher(data, 0, params)["weight"], expected, atol=1e-6, rtol=1e-5)


def test_fisher_merging_takes_each_weight_from_the_model_whose_data_moves_it() -> None:
    # Task 1's inputs never use feature 1, so model 1 has zero Fisher there and model 0's weight wins.
    g = torch.Generator().manual_seed(5)
    lin = nn.Linear(2, 2, bias=False)
    base = _sd(lin)
    models = [{"weight": torch.randn(2, 2, generator=g)} for _ in range(2)]
    x0 = torch.randn(12, 2, generator=g)
    x1 = torch.randn(12, 2, generator=g) * torch.tensor([1.0, 0.0])
    mc = Task("t", "multiclass", n_classes=2)
    data = MergeData(lin, [TaskData("a", [(x0, None)], None, mc), TaskData("b", [(x1, None)], None, mc)])
    merged = merge_state_dicts("fisher", base, models, data=data, eps=1e-12)["weight"]
    torch.testing.assert_close(merged[:, 1], models[0]["weight"][:, 1], atol=1e-5, rtol=1e-5)
    f = [diagonal_fisher(data, k, m)["weight"][:, 0] for k, m in enumerate(models)]
    expected = (f[0] * models[0]["weight"][:, 0] + f[1] * models[1]["weight"][:, 0]) / (f[0] + f[1])
    torch.testing.assert_close(merged[:, 0], expected, atol=1e-5, rtol=1e-5)
    grouped = fisher_merging(base, models, data=data, batch_size=4)["weight"]  # coarser estimate, same rule
    torch.testing.assert_close(grouped[:, 1], models[0]["weight"][:, 1], atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- AdaMerging / aTLAS
@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_adamerging_reduces_prediction_entropy_on_its_data(granularity: str) -> None:
    base, models, data = _pool(3, labels=False)
    init = learn_coefficients(
        base, models, data, granularity=granularity, objective="entropy", init=0.3, lr=1e-2, steps=0,
        clip=(0, 1), method="adamerging",
    )[0]  # fmt: skip
    merged, lam, _, names = learn_coefficients(
        base, models, data, granularity=granularity, objective="entropy", init=0.3, lr=5e-2, steps=40,
        clip=(0, 1), method="adamerging",
    )  # fmt: skip
    assert _mean_entropy(data, merged) < _mean_entropy(data, init) - 0.01
    assert lam.shape == (3, 1 if granularity == "task" else 4) and len(names) == lam.shape[1]
    assert float(lam.min()) >= 0.0 and float(lam.max()) <= 1.0
    # the result is task arithmetic with the learned coefficients
    key = "2.weight"
    col = 0 if granularity == "task" else names.index(key)
    expected = base[key] + sum(lam[k, col] * (models[k][key] - base[key]) for k in range(3))
    torch.testing.assert_close(merged[key], expected, atol=1e-5, rtol=1e-5)
    via_registry = merge_state_dicts("adamerging", base, models, data=data, granularity=granularity, steps=2)
    assert set(via_registry) == set(base)


def test_atlas_learns_one_coefficient_per_block_and_the_loss_decreases() -> None:
    base, models, data = _pool(3)
    _, lam, history, names = atlas_coefficients(base, models, data, objective="supervised", lr=5e-2, steps=40)
    assert names == list(base) and lam.shape == (3, len(base))
    assert len({round(float(v), 4) for v in lam.flatten()}) > 3  # anisotropic: blocks moved differently
    assert np.mean(history[-5:]) < 0.8 * np.mean(history[:5])
    ent = atlas_coefficients(base, models, data, objective="entropy", lr=5e-2, steps=20)[2]
    assert np.mean(ent[-5:]) < np.mean(ent[:5])


# ----------------------------------------------------------------------------- Concrete masking
@pytest.mark.parametrize("over", ["task_arithmetic", "adamerging"])
def test_concrete_mask_is_in_unit_interval_and_sparsifies(over: str) -> None:
    base, models, data = _pool(3, labels=False)
    kwargs = {"over": over, "init_logit": 1.0, "lr": 0.1, "steps": 40, "eval_mask": "discrete"}
    merged, probs, lam, _ = concrete_mask(base, models, data, sparsity=5.0, **kwargs)
    _, dense_probs, _, _ = concrete_mask(base, models, data, sparsity=0.0, **kwargs)
    flat = torch.cat([p.flatten() for p in probs.values()])
    dense = torch.cat([p.flatten() for p in dense_probs.values()])
    assert float(flat.min()) >= 0.0 and float(flat.max()) <= 1.0
    assert float(flat.mean()) < float(dense.mean()) and float((flat <= 0.5).float().mean()) > 0.2
    for key, p in probs.items():  # masked-out weights are the base's; kept ones follow task arithmetic
        off = p <= 0.5
        torch.testing.assert_close(merged[key][off], base[key][off])
        ta = base[key] + sum(lam[k, 0] * (models[k][key] - base[key]) for k in range(3))
        torch.testing.assert_close(merged[key][~off], ta[~off], atol=1e-5, rtol=1e-5)
    if over == "task_arithmetic":
        assert torch.all(lam == 0.3)
    # the continuous mask (the default) scales each entry of the task vectors by its probability
    soft, soft_probs, soft_lam, _ = concrete_mask(
        base, models, data, sparsity=5.0, **{**kwargs, "eval_mask": "continuous"}
    )
    for key, p in soft_probs.items():
        torch.testing.assert_close(p, probs[key])  # same seed, same training: the same mask
        want = base[key] + sum(soft_lam[k, 0] * p * (models[k][key] - base[key]) for k in range(3))
        torch.testing.assert_close(soft[key], want, atol=1e-5, rtol=1e-5)


def test_concrete_defaults_leave_task_arithmetic() -> None:
    """From logits 0 the mask starts at 1/2 and moves: neither the hard all-ones mask nor plain TA."""
    base, models, data = _pool(3, labels=False)
    merged, probs, _, history = concrete_mask(base, models, data, steps=60, lr=5e-2)
    flat = torch.cat([p.flatten() for p in probs.values()])
    assert 0.05 < float(flat.std()) and float(flat.min()) < 0.45 < 0.55 < float(flat.max())
    assert np.mean(history[-10:]) < np.mean(history[:10])  # the entropy objective went down
    ta = merge_state_dicts("task-arithmetic", base, models, lam=0.3)
    assert any(not torch.allclose(merged[k], ta[k], atol=1e-4) for k in base)
    with pytest.raises(ValueError, match=r"eval_mask must be one of continuous, discrete, got 'hard'"):
        concrete_mask(base, models, data, steps=1, eval_mask="hard")


# ----------------------------------------------------------------------------- Twin-Merging
def test_twin_merging_one_hot_full_rank_reconstructs_each_model() -> None:
    base, models, data = _pool(3)
    merged = twin_merging(base, models, data=data, rank=8, router_steps=150)
    twin = TwinMerged(merged)
    for k in range(3):
        params = twin.parameters_for(torch.eye(3)[k])
        for key in base:
            torch.testing.assert_close(params[key], models[k][key], atol=1e-5, rtol=1e-5)
    shared = {k: base[k] + 0.3 * sum(m[k] - base[k] for m in models) for k in base}
    for key in base:
        torch.testing.assert_close(twin.shared[key], shared[key], atol=1e-5, rtol=1e-5)
    # the router tells the (separable) tasks apart, batch by batch
    for k, t in enumerate(data.tasks):
        w = twin.route(data, t.batches[0][0])
        assert int(w.argmax()) == k and float(w[k]) > 0.8
        pred = twin.predict(data, k, t.batches[0][0])
        assert pred.shape == (16, 3)


def test_twin_merging_low_rank_keeps_rank_factors() -> None:
    base, models, data = _pool(2)
    merged = twin_merging(base, models, data=data, rank=2, router_steps=5)
    assert merged["twin.exclusive.0.0.weight.u"].shape == (8, 2)
    assert merged["twin.exclusive.1.2.weight.v"].shape == (2, 8)
    assert merged["twin.exclusive.0.0.bias.full"].shape == (8,)
    delta = TwinMerged(merged).delta(0, "0.weight")
    assert torch.linalg.matrix_rank(delta) == 2
    with pytest.raises(ValueError, match="not a Twin-Merging state dict"):
        TwinMerged(base)


# ----------------------------------------------------------------------------- MAP
def _dominates(a: np.ndarray, b: np.ndarray) -> bool:
    return bool(np.all(a >= b) and np.any(a > b))


def test_map_returns_mutually_non_dominated_models_under_its_surrogates() -> None:
    base, models, data = _pool(3)
    front, _ = map_front(base, models, data, n_samples=24, seed=0)
    assert front.surrogates.shape == (3, quadratic_features(np.zeros((1, 3))).shape[1])
    np.testing.assert_allclose(front.predicted, front.surrogate(front.coefficients))
    pts = front.predicted
    for i in range(len(pts)):
        for j in range(len(pts)):
            assert i == j or not _dominates(pts[j], pts[i]), (i, j, pts)
    # emphasising a task never lowers its surrogate metric below the uniform preference's
    for k in range(3):
        assert pts[1 + k, k] >= pts[0, k] - 1e-9
    out = map_merging(base, models, data=data, n_samples=24, preferences=[[1, 1, 1], {"t0": 3, "t1": 1, "t2": 1}])
    assert [round(p["t0"], 3) for p, _ in out] == [0.333, 0.6]
    c = front.coefficients[0]
    expected = {k: base[k] + sum(c[i] * (models[i][k] - base[k]) for i in range(3)) for k in base}
    for key in base:
        torch.testing.assert_close(out[0][1][key], expected[key].float(), atol=1e-5, rtol=1e-5)


def test_map_quadratic_fit_is_exact_for_a_quadratic() -> None:
    rng = np.random.default_rng(0)
    c = rng.uniform(size=(30, 2))
    truth = 1.0 - (c[:, 0] - 0.3) ** 2 - 2 * (c[:, 1] - 0.7) ** 2 + 0.5 * c[:, 0] * c[:, 1]
    coef = np.linalg.lstsq(quadratic_features(c), truth, rcond=None)[0]
    # [1, c0, c1, c0^2, c0 c1, c1^2] of the expanded polynomial
    np.testing.assert_allclose(coef, [1 - 0.09 - 0.98, 0.6, 2.8, -1.0, 0.5, -2.0], atol=1e-9)


def test_map_errors() -> None:
    base, models, data = _pool(2)
    with pytest.raises(ValueError, match=r"n_samples must be >= 6 to fit 2-task quadratics, got 3"):
        map_front(base, models, data, n_samples=3)
    with pytest.raises(ValueError, match=r"preference names unknown task\(s\) \['zz'\]"):
        map_merging(base, models, data=data, preferences=[{"zz": 1.0}])
    with pytest.raises(ValueError, match="each preference needs 2 positive weights"):
        map_merging(base, models, data=data, preferences=[[1.0, 0.0]])


def test_prediction_entropy_conventions() -> None:
    z = torch.zeros(4, 3)
    torch.testing.assert_close(prediction_entropy(z), torch.tensor(np.log(3.0), dtype=torch.float32))
    torch.testing.assert_close(
        prediction_entropy(torch.zeros(5), Task("b", "binary")), torch.tensor(np.log(2.0)).float()
    )
    assert prediction_entropy(torch.zeros(5), Task("r", "regression")) is None
    assert float(prediction_entropy(torch.full((3,), 50.0), Task("b", "binary"))) < 1e-15


def test_merge_data_validation_errors() -> None:
    lin = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=r"^task 'a': no data batches; give at least one batch of inputs$"):
        TaskData("a", [])
    one = TaskData("a", [(torch.zeros(1, 2), None)])
    with pytest.raises(ValueError, match=r"merge data task names must be unique, got \['a', 'a'\]"):
        MergeData(lin, [one, one])
    data = MergeData(lin, [one])
    with pytest.raises(ValueError, match="a supervised objective needs labelled batches and a Task"):
        data.loss(dict(lin.state_dict()), 0, one.batches[0])
    base = {k: v.clone() for k, v in lin.state_dict().items()}
    with pytest.raises(ValueError, match=r"tensor 'weight' is \(3, 2\) in model 0 but \(2, 2\) in the base"):
        check_models(base, [{"weight": torch.zeros(3, 2), "bias": torch.zeros(2)}], data, "regmean")
    with pytest.raises(TypeError, match="data must be a MergeData, got dict"):
        check_models(base, [base], {}, "regmean")
