"""The GLUE merge pool on a tiny random BERT and GLUE-format files: loading, scoring against a
hand-run reference, its one-line errors, and a ``kind: merge`` suite over it end to end.

The shipped pool reads MiniLM fine-tunes cached by ``benchmarks/merge_glue.py``; here the same
folder layout is written from a 2-layer BERT, so the pool's code runs in seconds without MiniLM.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

pytest.importorskip("transformers")
from transformers import BertModel, BertTokenizer

from polytask.bench import leaderboard, run_bench
from polytask.bench._pool import GluePool, open_pool
from polytask.data.glue import glue_bundle
from polytask.evaluate.metrics import compute_metrics, glue_score
from polytask.merge import merge_state_dicts
from polytask.nn.heads import TaskHead
from test_text import save_tiny_bert, write_glue_files, write_vocab

TASKS = ["sst2", "stsb"]  # one classification, one regression task
SETTINGS = {"max_train": None, "val_size": 2, "max_dev": None, "max_length": 16, "seed": 0}


@pytest.fixture(scope="module")
def pool_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("glue-pool")
    write_glue_files(root / "data")
    tokenizer = BertTokenizer(str(write_vocab(root / "vocab.txt")))
    base = save_tiny_bert(root / "encoder", tokenizer)
    bundle = glue_bundle(tokenizer, TASKS, root=root / "data", **SETTINGS)
    g = torch.Generator().manual_seed(1)
    for t in bundle.tasks:
        # "fine-tuned": the base weights plus a task's own small change, and a head of its own
        sd = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
              for k, v in base.state_dict().items()}  # fmt: skip
        d = root / "cache" / t.name
        d.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in sd.items()}, d / "encoder.safetensors")
        save_file(TaskHead(32, t).state_dict(), d / f"head-{t.name}.safetensors")
        rows = int(bundle.train.mask[t.name].sum())
        (d / "result.json").write_text(json.dumps({"train_rows": rows}))
    return {"root": root, "cache": root / "cache", "encoder": root / "encoder", "data": root / "data"}


def _pool(files: dict[str, Path], cache: Path | None = None) -> GluePool:
    folder = cache or files["cache"]
    return GluePool(folder, TASKS, encoder_path=files["encoder"], data_root=files["data"], **SETTINGS)


def _reference(files: dict[str, Path], task: str, weights: dict[str, torch.Tensor]) -> dict[str, float]:
    """Score ``weights`` on ``task``'s dev rows by hand: a fresh BERT, mean pooling, the task's head."""
    tok = BertTokenizer.from_pretrained(files["encoder"])
    bundle = glue_bundle(tok, TASKS, root=files["data"], **SETTINGS)
    model = BertModel.from_pretrained(files["encoder"]).eval()
    model.load_state_dict(weights)
    t = next(t for t in bundle.tasks if t.name == task)
    rows = torch.nonzero(bundle.test.mask[task]).flatten()
    x = {k: v[rows] for k, v in bundle.test.x.items()}
    with torch.no_grad():
        h = model(**{k: x[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in x}).last_hidden_state
        m = x["attention_mask"].unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1).clamp_min(1.0)
        head = TaskHead(32, t)
        head.load_state_dict(load_file(str(files["cache"] / task / f"head-{task}.safetensors")))
        pred = head.eval()(pooled)
    y = bundle.test.y[task][rows]
    out = compute_metrics(t, pred, y, torch.ones(len(rows), dtype=torch.bool))
    if task == "stsb":
        out["pearson"] = glue_score("pearson", pred, y)
    return out


def test_pool_scores_each_fine_tune_as_a_hand_run_reference(pool_files: dict[str, Path]) -> None:
    pool = _pool(pool_files)
    assert pool.task_names == TASKS
    for k, task in enumerate(TASKS):
        weights = load_file(str(pool_files["cache"] / task / "encoder.safetensors"))
        got = pool.evaluate_task(k, weights)
        want = _reference(pool_files, task, weights)
        assert got.keys() >= want.keys()
        for m, v in want.items():
            assert got[m] == pytest.approx(v, rel=1e-5, abs=1e-6), (task, m)
    # task arithmetic with lam = 1 on one fine-tune is that fine-tune (only the encoders are merged)
    one = merge_state_dicts("task-arithmetic", pool.base, [pool.models[0]], lam=1.0)
    assert pool.evaluate(one)["sst2"] == pytest.approx(pool.evaluate_task(0, pool.models[0]))
    assert "pearson" in pool.evaluate(pool.base)["stsb"]  # GLUE's official score beside polytask's


def test_pool_refuses_missing_files_and_other_splits(pool_files: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "cache"
    shutil.copytree(pool_files["cache"], broken)
    (broken / "stsb" / "head-stsb.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"head-stsb\.safetensors is missing; run benchmarks/merge_glue\.py"):
        _pool(pool_files, broken)
    shutil.copy(pool_files["cache"] / "stsb" / "head-stsb.safetensors", broken / "stsb")
    (broken / "sst2" / "result.json").write_text(json.dumps({"train_rows": 99}))
    with pytest.raises(ValueError, match=r"task 'sst2' was fine-tuned on 99 rows but these pool settings give \d+"):
        _pool(pool_files, broken)


def test_merge_suite_over_the_glue_pool(pool_files: dict[str, Path], tmp_path: Path) -> None:
    params = {
        "path": str(pool_files["cache"]),
        "tasks": TASKS,
        "encoder": str(pool_files["encoder"]),
        "data_root": str(pool_files["data"]),
        **SETTINGS,
    }
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "kind: merge\nname: tiny-glue\n"
        f"pool:\n  name: glue-minilm\n  label: tiny-glue\n  params: {json.dumps(params)}\n"
        "methods:\n  - {name: task-arithmetic, grid: {lam: [0.5]}}\n  - ties\n  - regmean\n"
        "seeds: [0]\ndata: {examples: 4, batch_size: 2}\nmetrics: {sst2: [accuracy], stsb: [mae]}\n"
    )
    summary = run_bench(suite, tmp_path / "bench", workers=0, threads=1)
    assert (summary.total, summary.executed, summary.failed) == (5, 5, 0)
    rows = {r.model: r for r in leaderboard(tmp_path / "bench").datasets["tiny-glue"]}
    assert set(rows) == {"individual", "pretrained", "task-arithmetic(lam=0.5)", "ties", "regmean"}
    assert rows["individual"].normalised == pytest.approx(100.0)
    assert rows["individual"].delta_m == pytest.approx(0.0)
    pool = open_pool({"name": "glue-minilm", "params": params})
    ta = pool.evaluate(merge_state_dicts("task-arithmetic", pool.base, pool.models, lam=0.5))
    assert rows["task-arithmetic(lam=0.5)"].mean["sst2"]["accuracy"] == pytest.approx(ta["sst2"]["accuracy"])
    assert rows["task-arithmetic(lam=0.5)"].mean["stsb"]["pearson"] == pytest.approx(ta["stsb"]["pearson"])
    ind = [pool.evaluate_task(k, m) for k, m in enumerate(pool.models)]
    by_hand = 50.0 * (ta["sst2"]["accuracy"] / ind[0]["accuracy"] + ind[1]["mae"] / ta["stsb"]["mae"])
    assert rows["task-arithmetic(lam=0.5)"].normalised == pytest.approx(by_hand)
    again = run_bench(suite, tmp_path / "bench", workers=0, threads=1)
    assert (again.executed, again.skipped) == (0, 5)
