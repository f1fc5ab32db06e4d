"""Data-free merge methods against hand-computed results and their defining properties."""

from __future__ import annotations

import math

import pytest
import torch

from polytask.merge import DATA_DRIVEN, MERGE_METHODS, merge_state_dicts
from polytask.merge import _select as select
from polytask.merge.breadcrumbs import breadcrumbs_mask
from polytask.merge.consensus import consensus_count
from polytask.merge.lines import lines_scale, prefix_depth
from polytask.merge.pcb import CLAMP


def _models(base: dict[str, torch.Tensor], *taus: dict[str, list[float]]) -> list[dict[str, torch.Tensor]]:
    return [{k: base[k] + torch.tensor(t[k]) for k in base} for t in taus]


def test_task_arithmetic_hand_computed_and_identity() -> None:
    base = {"w": torch.tensor([1.0, 2.0])}
    models = _models(base, {"w": [1.0, 0.0]}, {"w": [0.0, 2.0]})
    out = merge_state_dicts("task-arithmetic", base, models, lam=0.5)
    torch.testing.assert_close(out["w"], torch.tensor([1.5, 3.0]))
    weighted = merge_state_dicts("task-arithmetic", base, models, lam=1.0, weights=[2.0, -1.0])
    torch.testing.assert_close(weighted["w"], torch.tensor([3.0, 0.0]))
    # lam = 1 and one model: that model
    g = torch.Generator().manual_seed(0)
    b = {"a": torch.randn(7, 5, generator=g), "b": torch.randn(3, generator=g)}
    m = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in b.items()}
    one = merge_state_dicts("task-arithmetic", b, [m], lam=1.0)
    for k in b:
        torch.testing.assert_close(one[k], m[k], rtol=0, atol=1e-6)


def test_average_weighted() -> None:
    base = {"w": torch.zeros(2)}
    models = [{"w": torch.tensor([1.0, 3.0])}, {"w": torch.tensor([3.0, 7.0])}]
    torch.testing.assert_close(merge_state_dicts("average", base, models)["w"], torch.tensor([2.0, 5.0]))
    out = merge_state_dicts("average", base, models, weights=[3.0, 1.0])["w"]
    torch.testing.assert_close(out, torch.tensor([1.5, 4.0]))
    raw = merge_state_dicts("average", base, models, weights=[1.0, 1.0], normalize=False)["w"]
    torch.testing.assert_close(raw, torch.tensor([4.0, 10.0]))


def test_ties_trim_elect_disjoint_mean() -> None:
    base = {"w": torch.ones(5)}
    models = _models(
        base,
        {"w": [3.0, -1.0, 0.5, 2.0, -4.0]},  # top 3 by magnitude: 3, 2, -4
        {"w": [-2.0, -3.0, 1.0, 1.0, 5.0]},  # -2, -3, 5
        {"w": [1.0, 2.0, -0.2, -3.0, 1.0]},  # -3, 2 and both 1s (tied at the threshold: kept)
    )
    # trimmed sums [2, -1, 0, -1, 2] elect signs [+, -, 0, -, +]; agreeing means [2, -3, 0, -3, 3]
    out = merge_state_dicts("ties", base, models, density=0.6, topk="tensor", lam=1.0)["w"]
    torch.testing.assert_close(out, 1 + torch.tensor([2.0, -3.0, 0.0, -3.0, 3.0]))
    half = merge_state_dicts("ties", base, models, density=0.6, topk="tensor", lam=0.5)["w"]
    torch.testing.assert_close(half, 1 + 0.5 * torch.tensor([2.0, -3.0, 0.0, -3.0, 3.0]))
    # weights enter the vote and the mean: entry 0 with weights (1, 4, 1): 3 - 8 + 1 < 0 -> -2
    w = merge_state_dicts("ties", base, models, density=0.6, topk="tensor", weights=[1.0, 4.0, 1.0])["w"]
    assert float(w[0]) == pytest.approx(1 - 2.0)


def test_ties_negative_weight_keeps_the_general_disjoint_mean() -> None:
    # with a negative weight the masses no longer have fixed signs: P = [1, -3, 1], N = [0, -1, 2],
    # cP = [0, -1, 1], cN = [0, 1, -1]; total [1, -4, 3] elects P, N, P; entry 0 has no weight left (cP = 0)
    base = {"w": torch.zeros(3)}
    models = _models(base, {"w": [2.0, -1.0, 1.0]}, {"w": [1.0, 3.0, -2.0]})
    out = merge_state_dicts("ties", base, models, density=1.0, topk="tensor", lam=1.0, weights=[1.0, -1.0])["w"]
    torch.testing.assert_close(out, torch.tensor([0.0, -1.0, 1.0]))
    # weights (1, 0.5) take the branch-free path: P = [2.5, 1.5, 1], N = [0, -1, -1] elect +, + and none
    pos = merge_state_dicts("ties", base, models, density=1.0, topk="tensor", lam=1.0, weights=[1.0, 0.5])["w"]
    torch.testing.assert_close(pos, torch.tensor([2.5 / 1.5, 1.5 / 0.5, 0.0]))


def test_ties_whole_model_versus_per_tensor_top_k() -> None:
    base = {"a": torch.zeros(2), "b": torch.zeros(2)}
    models = _models(base, {"a": [10.0, 9.0], "b": [1.0, 2.0]})
    whole = merge_state_dicts("ties", base, models, density=0.5, topk="model")
    per = merge_state_dicts("ties", base, models, density=0.5, topk="tensor")
    torch.testing.assert_close(whole["a"], torch.tensor([10.0, 9.0]))
    torch.testing.assert_close(whole["b"], torch.tensor([0.0, 0.0]))
    torch.testing.assert_close(per["a"], torch.tensor([10.0, 0.0]))
    torch.testing.assert_close(per["b"], torch.tensor([0.0, 2.0]))


def test_dare_rescale_keeps_expectation_and_is_seeded() -> None:
    n, density = 200_000, 0.3
    base = {"w": torch.zeros(n)}
    models = [{"w": torch.ones(n)}]
    out = merge_state_dicts("dare", base, models, density=density, lam=1.0, seed=3)["w"]
    kept = out != 0
    assert torch.all(out[kept] == torch.tensor(1 / density))  # survivors rescaled by 1/density
    share = kept.float().mean().item()
    sd = math.sqrt(density * (1 - density) / n)
    assert abs(share - density) < 5 * sd
    # E[rescaled] = tau: the mean over 200k entries is within 5 standard errors of 1
    assert abs(out.mean().item() - 1) < 5 * math.sqrt((1 - density) / density / n)
    again = merge_state_dicts("dare", base, models, density=density, lam=1.0, seed=3)["w"]
    other = merge_state_dicts("dare", base, models, density=density, lam=1.0, seed=4)["w"]
    assert torch.equal(out, again) and not torch.equal(out, other)
    plain = merge_state_dicts("dare", base, models, density=density, lam=1.0, seed=3, rescale=False)["w"]
    assert torch.equal(plain != 0, kept) and torch.all(plain[kept] == 1)


def test_dare_ties_elects_signs_on_dropped_vectors() -> None:
    base = {"w": torch.zeros(4)}
    models = _models(base, {"w": [1.0, -1.0, 2.0, 0.0]}, {"w": [3.0, 2.0, -1.0, 0.0]})
    # density 1: nothing dropped, so DARE-TIES is sign election + disjoint mean of the raw vectors
    out = merge_state_dicts("dare", base, models, density=1.0, combine="ties", lam=1.0)["w"]
    torch.testing.assert_close(out, torch.tensor([2.0, 2.0, 2.0, 0.0]))


def test_breadcrumbs_two_sided_mask() -> None:
    tau = torch.arange(1.0, 11.0) * torch.tensor([1, -1] * 5)  # magnitudes 1..10, alternating signs
    mask = breadcrumbs_mask(tau, density=0.5, gamma=0.2)
    # the two largest (10, 9) are outliers, the next five (8..4) kept, the smallest three dropped
    assert mask.tolist() == [False, False, False, True, True, True, True, True, False, False]
    base = {"w": torch.full((10,), 2.0)}
    out = merge_state_dicts("breadcrumbs", base, [{"w": base["w"] + tau}], density=0.5, gamma=0.2, lam=1.0)["w"]
    torch.testing.assert_close(out, 2.0 + tau * mask)
    assert breadcrumbs_mask(tau, density=0.3, gamma=0.0).sum() == 3  # gamma 0: plain top-k


def test_consensus_mask_counts() -> None:
    base = {"w": torch.zeros(3)}
    models = _models(base, {"w": [2.0, 0.0, 1.0]}, {"w": [2.0, 0.0, -1.0]}, {"w": [0.0, 3.0, 0.5]})
    # |tau_i| > 0.5 |sum - tau_i|: task 1 -> [1, 0, 1], task 2 -> [1, 0, 1], task 3 -> [0, 1, 1]
    count = consensus_count(base["w"], [m["w"] for m in models], tall_lambda=0.5)
    assert count.tolist() == [2, 1, 3]
    out = merge_state_dicts("consensus", base, models, tall_lambda=0.5, k=2, lam=1.0)["w"]
    torch.testing.assert_close(out, torch.tensor([4.0, 0.0, 0.5]))
    all_in = merge_state_dicts("consensus", base, models, tall_lambda=0.5, k=0, lam=1.0)["w"]
    torch.testing.assert_close(all_in, torch.tensor([4.0, 3.0, 0.5]))  # k = 0: plain task arithmetic


def test_model_stock_angle_formula() -> None:
    base = {"w": torch.zeros(2)}
    orth = merge_state_dicts("model-stock", base, _models(base, {"w": [1.0, 0.0]}, {"w": [0.0, 1.0]}))["w"]
    torch.testing.assert_close(orth, torch.zeros(2))  # cos = 0 -> t = 0: the pretrained weights
    out = merge_state_dicts("model-stock", base, _models(base, {"w": [1.0, 0.0]}, {"w": [1.0, 1.0]}))["w"]
    c = 1 / math.sqrt(2)
    t = 2 * c / (1 + c)
    torch.testing.assert_close(out, torch.tensor([t * 1.0, t * 0.5]))
    same = merge_state_dicts("model-stock", base, _models(base, {"w": [1.0, 2.0]}, {"w": [1.0, 2.0]}))["w"]
    torch.testing.assert_close(same, torch.tensor([1.0, 2.0]))  # cos = 1 -> t = 1: the average


def test_lines_scaling_per_depth() -> None:
    names = ["encoder.layer.0.w", "encoder.layer.1.w", "encoder.layer.2.w", "embeddings.w"]
    base = {n: torch.zeros(3) for n in names}
    models = [{n: torch.ones(3) for n in names}]
    out = merge_state_dicts("lines", base, models, alpha=0.2, beta=0.6)
    for n, s in zip(names, [0.2, 0.5, 0.8, 0.2], strict=True):
        torch.testing.assert_close(out[n], torch.full((3,), s))
    last = merge_state_dicts("lines", base, models, alpha=0.2, beta=0.6, unindexed="last")
    torch.testing.assert_close(last["embeddings.w"], torch.full((3,), 0.8))
    assert lines_scale(5, 1, 0.4, 1.0) == 0.4
    # on TIES: with one model and density 1, TIES' vector is the task vector itself
    ties = merge_state_dicts("lines", base, models, alpha=0.2, beta=0.6, on="ties", density=1.0)
    torch.testing.assert_close(ties["encoder.layer.1.w"], torch.full((3,), 0.5))


def test_lines_depth_from_named_layers() -> None:
    # a small CNN: no block index in the names, so depth comes from the layers given, shallowest first
    names = ["trunk.conv1.weight", "trunk.conv1.bias", "trunk.conv2.weight", "trunk.fc.weight", "norm.weight"]
    base = {n: torch.zeros(2) for n in names}
    models = [{n: torch.ones(2) for n in names}]
    layers = ["trunk.conv1", "trunk.conv2", "trunk.fc"]
    out = merge_state_dicts("lines", base, models, alpha=0.1, beta=0.8, layers=layers)
    for n, s in zip(names, [0.1, 0.1, 0.5, 0.9, 0.1], strict=True):
        torch.testing.assert_close(out[n], torch.full((2,), s))
    # without layers every tensor is unindexed: plain task arithmetic at alpha
    flat = merge_state_dicts("lines", base, models, alpha=0.1, beta=0.8)
    assert all(torch.allclose(flat[n], torch.full((2,), 0.1)) for n in names)
    # the longest prefix wins, and names given as layers override the integer in "towers.0"
    assert prefix_depth("trunk.fc.weight", ["trunk", "trunk.fc"]) == 1
    assert prefix_depth("trunk.fcx.weight", ["trunk.fc"]) is None
    with pytest.raises(ValueError, match=r"layers entry 'trunk.fc2' matches no tensor of the models \(their names"):
        merge_state_dicts("lines", base, models, layers=["trunk.conv1", "trunk.fc2"])
    with pytest.raises(ValueError, match=r"layers must be a list of tensor-name prefixes, shallowest first"):
        merge_state_dicts("lines", base, models, layers="trunk.fc")
    with pytest.raises(ValueError, match=r"layers names a prefix twice"):
        merge_state_dicts("lines", base, models, layers=["trunk.fc", "trunk.fc"])


def _pcb_dense(base: dict, models: list[dict], ratio: float, lam: float) -> dict[str, torch.Tensor]:
    """PCB written densely over the flattened model, as the authors' code does, for comparison."""
    names = list(base)
    flat_b = torch.cat([base[n].reshape(-1) for n in names])
    taus = torch.stack([torch.cat([m[n].reshape(-1) for n in names]) - flat_b for m in models])
    n, d = taus.shape

    def clamp_q(x: torch.Tensor, lo_share: float, hi_share: float) -> torch.Tensor:
        s = x.sort(dim=1).values
        lo = s[:, int(d * lo_share)].unsqueeze(1)
        hi = s[:, int(d * (1 - hi_share) - 1)].unsqueeze(1)
        return torch.clamp(x, lo, hi)

    def norm(x: torch.Tensor) -> torch.Tensor:
        lo, hi = x.min(dim=1, keepdim=True).values, x.max(dim=1, keepdim=True).values
        return (x - lo) / (hi - lo)

    a = clamp_q(taus.abs(), CLAMP, CLAMP)
    score = torch.exp(n * norm(a) ** 2) * torch.tanh(taus * taus.sum(0))
    scale = norm(clamp_q(score, 1 - ratio, 0))
    merged = (torch.sign(taus) * a * scale).sum(0) / torch.clamp(scale.sum(0), min=1e-12)
    out, i = {}, 0
    for nme in names:
        k = base[nme].numel()
        out[nme] = base[nme] + lam * merged[i : i + k].view(base[nme].shape)
        i += k
    return out


def test_pcb_streaming_matches_dense_reference() -> None:
    g = torch.Generator().manual_seed(1)
    base = {"a": torch.randn(40, 30, generator=g), "b": torch.randn(25, generator=g)}
    models = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    out = merge_state_dicts("pcb", base, models, ratio=0.2, lam=0.7)
    ref = _pcb_dense(base, models, 0.2, 0.7)
    for k in base:
        torch.testing.assert_close(out[k], ref[k], rtol=1e-5, atol=1e-6)
    # only the top `ratio` share of scores gets a positive weight: most entries stay at the base
    moved = sum(int((out[k] != base[k]).sum()) for k in base)
    total = sum(v.numel() for v in base.values())
    assert moved <= 3 * math.ceil(0.2 * total) and moved > 0


def test_exact_kth_largest_all_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300_000, generator=g)
    chunks = [x[:70_000], x[70_000:]]

    def stream():
        for c in chunks:
            yield c.numel(), (lambda idx, c=c: [c if idx is None else c[idx], c.abs() if idx is None else c[idx].abs()])

    ks = [1, 4_321, 299_999]
    ref = x.sort(descending=True).values
    ref_abs = x.abs().sort(descending=True).values
    for k in ks:
        assert float(select.kth_largest(x.abs(), k)) == float(ref_abs[k - 1])
        got = select.kth_largest_stream(stream, x.numel(), [k, k])
        assert got == [float(ref[k - 1]), float(ref_abs[k - 1])]
    # float64 values, and values with many exact ties at the threshold (the bracket's edges are sampled
    # values, compared in the values' own dtype)
    for v in (x.double() * 1e-3, (x * 8).round() / 8):
        srt = v.abs().sort(descending=True).values
        for k in (17, 123_456, 250_000):
            one = [(v.numel(), lambda idx, v=v: [v.abs() if idx is None else v[idx].abs()])]
            assert select.kth_largest_stream(lambda one=one: one, v.numel(), [k]) == [float(srt[k - 1])]
    # a bracket too narrow to hold the answer: the exact fallbacks (kthvalue, radix select) take over
    monkeypatch.setattr(select, "_Z", -50.0)
    calls = []
    radix = select._radix_stream
    monkeypatch.setattr(select, "_radix_stream", lambda *a: calls.append(1) or radix(*a))
    for k in ks:
        assert float(select.kth_largest(x.abs(), k)) == float(ref_abs[k - 1])
        assert select.kth_largest_stream(stream, x.numel(), [k, k]) == [float(ref[k - 1]), float(ref_abs[k - 1])]
    assert calls


@pytest.mark.parametrize(
    ("method", "params", "message"),
    [
        ("ties", {"density": 1.5}, "merge method 'ties': density=1.5 is out of range (0, 1]"),
        ("ties", {"density": 0}, "merge method 'ties': density=0 is out of range (0, 1]"),
        ("task-arithmetic", {"lam": float("inf")}, "merge method 'task-arithmetic': lam=inf is out of range"),
        ("ties", {"topk": "layer"}, "merge method 'ties': topk='layer' is not one of model, tensor"),
        ("dare", {"combine": "x"}, "merge method 'dare': combine='x' is not one of task-arithmetic, ties"),
        ("breadcrumbs", {"gamma": 0.3, "density": 0.8}, "gamma + density = 1.1 exceeds 1"),
        ("consensus", {"k": 5}, "merge method 'consensus': k=5 must be an integer in [0, 2]"),
        ("task-arithmetic", {"weights": [1.0]}, "weights has 1 values for 2 models"),
        ("ties", {"alpha": 1}, "merge method 'ties' has no parameter ['alpha']; valid: density, lam, topk, weights"),
        ("nope", {}, "unknown merge method 'nope'"),
    ],
)
def test_bad_parameters_are_one_line_errors(method: str, params: dict, message: str) -> None:
    base = {"w": torch.zeros(3)}
    with pytest.raises((ValueError, KeyError)) as e:
        merge_state_dicts(method, base, [{"w": torch.ones(3)}, {"w": torch.ones(3)}], **params)
    text = e.value.args[0]
    assert message in text and "\n" not in text


def test_model_stock_needs_two_models_and_registry_lists_papers() -> None:
    with pytest.raises(ValueError, match="at least two fine-tuned models"):
        merge_state_dicts("model-stock", {"w": torch.zeros(2)}, [{"w": torch.ones(2)}])
    data_free = {
        "average",
        "task-arithmetic",
        "ties",
        "dare",
        "breadcrumbs",
        "consensus",
        "lines",
        "pcb",
        "model-stock",
    }
    assert data_free <= set(MERGE_METHODS) and not data_free & DATA_DRIVEN
    for name in data_free:
        assert "(" in MERGE_METHODS[name].paper  # venue and year


def _ties_dense(base: dict, models: list[dict], density: float, scope: str) -> dict[str, torch.Tensor]:
    """TIES written densely with full sorts, for comparison with the streaming implementation."""
    names = list(base)

    def flat(sd: dict, ks: list[str]) -> torch.Tensor:
        return torch.cat([sd[k].reshape(-1) for k in ks])

    groups = [names] if scope == "model" else [[k] for k in names]
    out = {}
    for ks in groups:
        taus = torch.stack([flat(m, ks) - flat(base, ks) for m in models])
        k = round(density * taus.shape[1])
        thr = taus.abs().sort(dim=1, descending=True).values[:, k - 1 : k]
        trimmed = taus * (taus.abs() >= thr)
        sign = torch.sign(trimmed.sum(0))
        agree = (torch.sign(trimmed) == sign) & (trimmed != 0)
        merged = (trimmed * agree).sum(0) / agree.sum(0).clamp(min=1)
        i = 0
        for name in ks:
            n = base[name].numel()
            out[name] = base[name] + merged[i : i + n].view(base[name].shape)
            i += n
    return out


@pytest.mark.parametrize("scope", ["model", "tensor"])
def test_ties_matches_dense_sort_reference_at_scale(scope: str) -> None:
    g = torch.Generator().manual_seed(5)
    base = {"a": torch.randn(500, 400, generator=g), "b": torch.randn(150_000, generator=g)}
    models = [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    out = merge_state_dicts("ties", base, models, density=0.2, topk=scope)
    ref = _ties_dense(base, models, 0.2, scope)
    for k in base:
        torch.testing.assert_close(out[k], ref[k], rtol=0, atol=1e-6)
