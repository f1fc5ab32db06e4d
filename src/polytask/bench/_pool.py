"""Merging pools: a pretrained model, one fine-tuned model per task, and each task's evaluation data.

A pool is what a merge suite merges and scores (FusionBench's pool -> method -> evaluation split). It
gives the tensors that merge methods combine (``base`` and ``models``, aligned, one model per task in
task order), scores any merged tensors on every task's test split with that task's own fine-tuned
head (heads are never merged), and hands data-driven methods a :class:`polytask.merge.MergeData` of
validation rows (never test rows).

Two kinds:

- :class:`CheckpointPool`, a folder written by a pool builder (or by hand, for your own models)::

      pool.json                 {"format": "polytask-merge-pool", "version": 1,
                                 "data": {"source", "tasks", "options", "split_seed"},   # polytask.train.load_data
                                 "model": {"name", "params"},                             # polytask.nn.build_model
                                 "tasks": [Task.to_dict(), ...], "base": "base.safetensors",
                                 "models": {"<task>": "<task>.safetensors", ...},
                                 "merge_keys": ["trunk.0.weight", ...], "sha256": {"<file>": "<hex>"}}
      base.safetensors          the pretrained multi-task model's full state dict
      <task>.safetensors        the full state dict after fine-tuning on <task> alone

  ``merge_keys`` are the shared tensors (what is merged); every other tensor of ``<task>.safetensors``
  that belongs to task ``<task>`` is that task's head. The builder ``finetune`` (and its preset
  ``multimnist-lenet``) pretrains a hard-sharing model on all tasks jointly, then fine-tunes a copy per
  task, deterministically by seed, and caches the folder under ``<cache dir>/merge-pools/``.
- :class:`GluePool`, the MiniLM GLUE fine-tunes of ``benchmarks/merge_glue.py`` read from its cache
  folder (``<task>/encoder.safetensors`` + ``<task>/head-<task>.safetensors``), scored on GLUE dev.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from polytask._registry import Registry
from polytask.nn import MultiTaskModel
from polytask.tasks import Task

__all__ = [
    "POOLS",
    "POOL_FORMAT",
    "CheckpointPool",
    "GluePool",
    "Pool",
    "build_finetune_pool",
    "open_pool",
    "pool_cache_dir",
    "register_pool",
]

POOL_FORMAT = "polytask-merge-pool"
POOL_VERSION = 1

StateDict = dict[str, torch.Tensor]
Results = dict[str, dict[str, float]]


class Pool:
    """What a merge run needs from a pool (see the module docstring)."""

    tasks: list[Task]
    base: StateDict  # the mergeable tensors of the pretrained model
    models: list[StateDict]  # the same keys, one fine-tuned model per task, in task order

    @property
    def task_names(self) -> list[str]:
        return [t.name for t in self.tasks]

    def evaluate(self, merged: Mapping[str, torch.Tensor]) -> Results:
        """Every task's test metrics with ``merged`` in place of the mergeable tensors."""
        raise NotImplementedError

    def evaluate_individual(self) -> Results:
        """Each task scored by its own fine-tuned model: the reference of the normalised score and Δm."""
        return {t: self.evaluate_task(k, self.models[k]) for k, t in enumerate(self.task_names)}

    def evaluate_task(self, k: int, weights: Mapping[str, torch.Tensor]) -> dict[str, float]:
        return self.evaluate(weights)[self.task_names[k]]

    def merge_data(self, examples: int, batch_size: int, seed: int) -> Any:
        """A :class:`polytask.merge.MergeData` of ``examples`` labelled validation rows per task."""
        raise NotImplementedError


# ----------------------------------------------------------------------------- checkpoint folders
def _sha256(path: Path) -> str:
    from polytask.data import sha256_file

    return sha256_file(path)


def _model_features(module: torch.nn.Module, params: Mapping[str, torch.Tensor], x: Any) -> Any:
    # The skeleton is the whole multi-task model (each task's fine-tuned tower in place), so any
    # architecture works; the task's "head" then picks its prediction out of the output dict.
    return torch.func.functional_call(module, dict(params), (x,), strict=False)


def _val_batches(
    val: Any, tasks: Sequence[Any], examples: int, batch_size: int, seed: int
) -> list[tuple[Any, list[Any]]]:
    """Per task, ``examples`` of its labelled validation rows drawn by ``seed``, as (inputs, labels) batches."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for t in tasks:
        rows = torch.nonzero(val.mask[t.name]).flatten()
        rows = rows[torch.randperm(len(rows), generator=gen)[:examples]]
        batches = [
            ({k: v[rows[s : s + batch_size]] for k, v in val.x.items()}, val.y[t.name][rows[s : s + batch_size]])
            for s in range(0, len(rows), batch_size)
        ]
        out.append((t, batches))
    return out


class _Pick:
    """A TaskData head: task ``name``'s prediction from the model's output dict."""

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, out: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return out[self.name]


class CheckpointPool(Pool):
    """A pool folder with ``pool.json`` (see the module docstring); files are sha256-checked."""

    def __init__(self, folder: str | Path) -> None:
        from polytask.nn import build_model

        self.folder = Path(folder)
        manifest = self.folder / "pool.json"
        if not manifest.is_file():
            raise FileNotFoundError(f"{self.folder} is not a merge pool: no pool.json (see polytask.bench._pool)")
        try:
            doc = json.loads(manifest.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(f"{manifest} is not valid JSON (line {e.lineno}): {e.msg}") from None
        if not isinstance(doc, dict) or doc.get("format") != POOL_FORMAT:
            raise ValueError(f"{manifest} is not a {POOL_FORMAT} manifest (format: {doc.get('format')!r})")
        for key in ("data", "model", "tasks", "base", "models", "merge_keys"):
            if key not in doc:
                raise ValueError(f"{manifest}: key '{key}' is missing")
        self.doc = doc
        self._bundle: Any = None
        self.tasks = [Task.from_dict(t) for t in doc["tasks"]]
        missing = [t for t in self.task_names if t not in doc["models"]]
        if missing:
            raise ValueError(f"{manifest}: no fine-tuned model for task(s) {missing} under 'models'")
        keys = list(doc["merge_keys"])
        full_base = self._read(doc["base"])
        full_models = [self._read(doc["models"][t]) for t in self.task_names]
        for t, sd in zip(self.task_names, full_models, strict=True):
            if set(sd) != set(full_base):
                diff = sorted(set(sd) ^ set(full_base))[:3]
                raise ValueError(f"{self.folder}: the model of task '{t}' and the base differ in tensors, e.g. {diff}")
        absent = [k for k in keys if k not in full_base]
        if absent:
            raise ValueError(f"{manifest}: merge key '{absent[0]}' is not a tensor of {doc['base']}")
        self.base = {k: full_base[k] for k in keys}
        self.models = [{k: sd[k] for k in keys} for sd in full_models]
        model = build_model(doc["model"]["name"], self.tasks, self._data().input_spec, **doc["model"]["params"])
        model.load_state_dict(full_base)
        # each task's fine-tuned head (its tower and that tower's buffers) in one evaluation model
        state = model.state_dict()
        for t, sd in zip(self.task_names, full_models, strict=True):
            for key in model.task_state_keys(t):
                state[key] = sd[key]
        model.load_state_dict(state)
        self.model = model.eval()
        self._own = {k: v.clone() for k, v in model.state_dict().items() if k in set(keys)}

    def _read(self, name: str) -> StateDict:
        path = self.folder / name
        if not path.is_file():
            raise FileNotFoundError(f"{self.folder / 'pool.json'} names {name}, which does not exist")
        want = (self.doc.get("sha256") or {}).get(name)
        if want is not None and _sha256(path) != want:
            raise ValueError(f"{path} does not match its sha256 in pool.json: rebuild the pool (delete {self.folder})")
        return load_file(str(path))

    def _data(self) -> Any:
        if self._bundle is None:
            from polytask.train import load_data

            d = self.doc["data"]
            self._bundle = load_data(d["source"], d.get("tasks") or None, seed=d["split_seed"], **d["options"])
        return self._bundle

    @torch.no_grad()
    def evaluate(self, merged: Mapping[str, torch.Tensor]) -> Results:
        from polytask.train import evaluate_model

        bundle = self._data()
        if bundle.test is None:
            raise ValueError(f"pool {self.folder}: its data set has no test split to score merged models on")
        try:
            self.model.load_state_dict({k: merged[k].to(v.dtype) for k, v in self._own.items()}, strict=False)
            return evaluate_model(self.model, bundle.test, self.tasks)
        finally:
            self.model.load_state_dict(self._own, strict=False)

    def merge_data(self, examples: int, batch_size: int, seed: int) -> Any:
        import copy

        from polytask.merge import MergeData, TaskData

        val = self._data().val
        tasks = [
            TaskData(t.name, b, _Pick(t.name), t) for t, b in _val_batches(val, self.tasks, examples, batch_size, seed)
        ]
        # a copy: MergeData freezes its skeleton's parameters, and this pool's model evaluates later runs
        return MergeData(copy.deepcopy(self.model), tasks, features=_model_features)


# ----------------------------------------------------------------------------- GLUE (MiniLM) cache
class GluePool(Pool):
    """A text encoder fine-tuned per GLUE task, in the cache layout of ``benchmarks/merge_glue.py``:
    ``FOLDER/<task>/encoder.safetensors`` (the fine-tuned encoder), ``head-<task>.safetensors`` and
    optionally ``result.json`` (``train_rows``, checked against these settings' split).

    ``encoder_path`` is the Hugging Face folder of the encoder the fine-tunes started from (default:
    the installed all-MiniLM-L6-v2) and ``data_root`` the folder holding ``glue/`` (default:
    ``POLYTASK_DATA``).
    """

    def __init__(
        self,
        folder: str | Path,
        tasks: Sequence[str],
        *,
        max_train: int | None,
        val_size: int,
        max_dev: int | None,
        max_length: int,
        seed: int,
        encoder_path: str | Path | None = None,
        data_root: str | Path | None = None,
    ) -> None:
        from polytask.data.glue import glue_bundle
        from polytask.nn.heads import TaskHead
        from polytask.nn.text import load_text_encoder

        self.folder = Path(folder)
        encoder, tokenizer = load_text_encoder(encoder_path)
        self.encoder = encoder.eval()
        # the same splits (and STS-B standardisation) as the fine-tuning run that made the folder
        self.bundle = glue_bundle(
            tokenizer,
            list(tasks),
            max_train=max_train,
            val_size=val_size,
            max_dev=max_dev,
            max_length=max_length,
            seed=seed,
            root=data_root,
        )
        self.tasks = list(self.bundle.tasks)
        self.base = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
        self.models, self.heads = [], {}
        hidden = int(encoder.config.hidden_size)
        for t in self.tasks:
            enc = self.folder / t.name / "encoder.safetensors"
            head_file = self.folder / t.name / f"head-{t.name}.safetensors"
            for p in (enc, head_file):
                if not p.is_file():
                    raise FileNotFoundError(
                        f"GLUE pool {self.folder}: {p} is missing; run benchmarks/merge_glue.py --stage finetune"
                    )
            done = self.folder / t.name / "result.json"
            if done.is_file():  # the splits must be those the heads were trained on
                rows = json.loads(done.read_text(encoding="utf-8")).get("train_rows")
                have = int(self.bundle.train.mask[t.name].sum())
                if rows is not None and rows != have:
                    raise ValueError(
                        f"GLUE pool {self.folder}: task '{t.name}' was fine-tuned on {rows} rows but these pool "
                        f"settings give {have}; set the pool's max_train / val_size / seed to those of that run"
                    )
            self.models.append(load_file(str(enc)))
            head = TaskHead(hidden, t)
            head.load_state_dict(load_file(str(head_file)))
            self.heads[t.name] = head.eval()

    def _split_scores(self, params: Mapping[str, torch.Tensor], split: Any, names: Sequence[str]) -> Results:
        from polytask.data.glue import GLUE_METRICS
        from polytask.evaluate.metrics import compute_metrics, glue_score
        from polytask.nn.text import pooled_features

        out: Results = {}
        for t in self.tasks:
            if t.name not in names:
                continue
            rows = torch.nonzero(split.mask[t.name]).flatten()
            x = {k: v[rows] for k, v in split.x.items()}
            order = x["attention_mask"].sum(1).argsort()  # length-sorted batches: less padding
            preds = []
            with torch.no_grad():
                for s in range(0, len(rows), 64):
                    idx = order[s : s + 64]
                    z = pooled_features(self.encoder, dict(params), {k: v[idx] for k, v in x.items()})
                    preds.append((idx, self.heads[t.name](z)))
            pred = torch.empty_like(torch.cat([p for _, p in preds]))
            for idx, p in preds:
                pred[idx] = p
            y = split.y[t.name][rows]
            out[t.name] = compute_metrics(t, pred, y, torch.ones(len(rows), dtype=torch.bool))
            # GLUE's official scores beside polytask's own (a suite's `metrics:` picks among them)
            out[t.name].update(
                {m: glue_score(m, pred, y) for m in GLUE_METRICS.get(t.name, ()) if m not in out[t.name]}
            )
        return out

    def evaluate(self, merged: Mapping[str, torch.Tensor]) -> Results:
        assert self.bundle.test is not None
        return self._split_scores(merged, self.bundle.test, self.task_names)

    def evaluate_task(self, k: int, weights: Mapping[str, torch.Tensor]) -> dict[str, float]:
        assert self.bundle.test is not None
        name = self.task_names[k]
        return self._split_scores(weights, self.bundle.test, [name])[name]

    def merge_data(self, examples: int, batch_size: int, seed: int) -> Any:
        from polytask.merge import MergeData, TaskData
        from polytask.nn.text import pooled_features

        val = self.bundle.val
        tasks = [
            TaskData(t.name, b, self.heads[t.name], t)
            for t, b in _val_batches(val, self.tasks, examples, batch_size, seed)
        ]
        return MergeData(self.encoder, tasks, features=pooled_features)


# ----------------------------------------------------------------------------- builders
PoolBuilder = Callable[..., Pool]
POOLS: Registry[PoolBuilder] = Registry("merge pool")


def register_pool(name: str, paper: str, description: str, **defaults: Any) -> Callable[[PoolBuilder], PoolBuilder]:
    """Decorator: a pool builder ``fn(**params) -> Pool`` available by ``name`` in suites."""
    return POOLS.register(name, paper, description, **defaults)


def pool_cache_dir() -> Path:
    from polytask.data import cache_dir

    return cache_dir() / "merge-pools"


def _atomic_save(tensors: StateDict, path: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous() for k, v in tensors.items()}, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _train_config(settings: Mapping[str, Any], seed: int, what: str) -> Any:
    from polytask.train import TrainConfig

    fields = {f.name for f in dataclasses.fields(TrainConfig)} - {"seed"}
    unknown = sorted(set(settings) - fields)
    if unknown:
        raise ValueError(
            f"pool '{what}' setting {unknown} is not a training setting; valid: {', '.join(sorted(fields))}"
        )
    return TrainConfig(**{"patience": None, **settings, "seed": seed})


def _shared_keys(model: MultiTaskModel) -> list[str]:
    own = {k for t in model.task_names for k in model.task_state_keys(t)}
    return [k for k in model.state_dict() if k not in own]


def _transfer(src: MultiTaskModel, dst: MultiTaskModel, task: str) -> None:
    """Copy the shared tensors (by name) and ``task``'s own tensors (in order) from ``src`` into ``dst``."""
    s_state, d_state = src.state_dict(), dst.state_dict()
    s_task, d_task = src.task_state_keys(task), dst.task_state_keys(task)
    s_shared, d_shared = _shared_keys(src), _shared_keys(dst)
    if sorted(s_shared) != sorted(d_shared) or len(s_task) != len(d_task):
        raise ValueError(
            "this architecture's shared tensors depend on the number of tasks; a fine-tuning pool needs a "
            "hard-sharing model (e.g. shared-bottom)"
        )
    for k in d_shared:
        d_state[k] = s_state[k].clone()
    for sk, dk in zip(s_task, d_task, strict=True):
        d_state[dk] = s_state[sk].clone()
    dst.load_state_dict(d_state)


def build_finetune_pool(
    *,
    dataset: str,
    tasks: Sequence[str] | None = None,
    data_params: Mapping[str, Any] | None = None,
    split_seed: int = 0,
    model: str = "shared-bottom",
    model_params: Mapping[str, Any] | None = None,
    pretrain: Mapping[str, Any] | None = None,
    finetune: Mapping[str, Any] | None = None,
    seed: int = 0,
    output: str | Path | None = None,
    echo: Callable[[str], Any] | None = None,
) -> Path:
    """Pretrain ``model`` on all tasks of ``dataset`` jointly, then fine-tune a copy on each task alone.

    Returns the pool folder (``output``, default a folder under :func:`pool_cache_dir` named by the
    hash of these arguments); an existing complete folder is reused. Deterministic by ``seed``.
    """
    from polytask.bench._suite import canonical_json, config_hash
    from polytask.nn import build_model
    from polytask.train import Trainer, load_data

    data_params = dict(data_params or {})
    model_params = dict(model_params or {})
    source = str(Path(dataset).resolve()) if Path(str(dataset)).is_file() else str(dataset)
    spec: dict[str, Any] = {
        "dataset": source,
        "tasks": list(tasks or []),
        "data_params": data_params,
        "split_seed": split_seed,
        "model": model,
        "model_params": model_params,
        "pretrain": dict(pretrain or {}),
        "finetune": dict(finetune or {}),
        "seed": seed,
        "version": POOL_VERSION,
    }
    if Path(source).is_file():  # a table file: the pool depends on its bytes, not its name
        spec["dataset_sha256"] = _sha256(Path(source))
    folder = Path(output) if output is not None else pool_cache_dir() / f"finetune-{config_hash(spec)[:16]}"
    if (folder / "pool.json").is_file():
        return folder
    pre_cfg = _train_config(spec["pretrain"], seed, "pretrain")
    ft_cfg = _train_config(spec["finetune"], seed, "finetune")
    t0 = time.perf_counter()
    bundle = load_data(source, list(tasks) if tasks else None, seed=split_seed, **data_params)
    torch.manual_seed(seed)
    net = build_model(model, bundle.tasks, bundle.input_spec, **model_params)
    # On the CPU: a pool is cached by its settings, so it must not depend on the machine's GPU.
    Trainer(net, bundle, "equal", pre_cfg, run_dir=None, progress=False, device="cpu").fit()
    base = {k: v.detach().clone() for k, v in net.state_dict().items()}
    merge_keys = [k for k in _shared_keys(net) if base[k].is_floating_point()]
    if echo is not None:
        echo(
            f"pool: pretrained {model} on {bundle.name} ({len(bundle.train)} rows) in {time.perf_counter() - t0:.0f} s"
        )
    finetuned: dict[str, StateDict] = {}
    for i, t in enumerate(bundle.tasks):
        one = bundle.select_tasks([t.name])
        torch.manual_seed(seed * 1000 + i + 1)
        single = build_model(model, one.tasks, one.input_spec, **model_params)
        _transfer(net, single, t.name)
        Trainer(single, one, "equal", ft_cfg, run_dir=None, progress=False, device="cpu").fit()
        full = build_model(model, bundle.tasks, bundle.input_spec, **model_params)
        full.load_state_dict(base)
        _transfer(single, full, t.name)
        finetuned[t.name] = {k: v.detach().clone() for k, v in full.state_dict().items()}
        if echo is not None:
            echo(f"pool: fine-tuned on '{t.name}' ({time.perf_counter() - t0:.0f} s so far)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        _atomic_save(base, tmp / "base.safetensors")
        files = {t: f"{t}.safetensors" for t in finetuned}
        for t, sd in finetuned.items():
            _atomic_save(sd, tmp / files[t])
        doc = {
            "format": POOL_FORMAT,
            "version": POOL_VERSION,
            "data": {
                "source": source,
                "tasks": list(tasks or []),
                "options": data_params,
                "split_seed": split_seed,
            },
            "model": {"name": model, "params": model_params},
            "tasks": [t.to_dict() for t in bundle.tasks],
            "base": "base.safetensors",
            "models": files,
            "merge_keys": merge_keys,
            "sha256": {f: _sha256(tmp / f) for f in ["base.safetensors", *files.values()]},
            "build": {**json.loads(canonical_json(spec)), "seconds": round(time.perf_counter() - t0, 1)},
        }
        (tmp / "pool.json").write_text(json.dumps(doc, indent=1), encoding="utf-8")
        try:
            os.replace(tmp, folder)  # the whole folder appears at once
        except OSError:
            if not (folder / "pool.json").is_file():  # not a concurrent build of the same pool
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


@register_pool(
    "finetune",
    paper="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (pretrain once, fine-tune per task)",
    description="pretrain a hard-sharing model on all tasks of a data set, then fine-tune a copy per task",
    dataset=None,
    tasks=None,
    data_params=None,
    split_seed=0,
    model="shared-bottom",
    model_params=None,
    pretrain=None,
    finetune=None,
    seed=0,
)
def _finetune_pool(**params: Any) -> Pool:
    if not params.get("dataset"):
        raise ValueError("pool 'finetune' needs 'dataset' (a built-in data set or a table file)")
    return CheckpointPool(build_finetune_pool(**params))


# Multi-MNIST: 2 epochs of joint pretraining (a capable "pretrained model", as merging assumes), then
# 1 epoch per task at a lower learning rate (fine-tunes that stay near it, as task vectors assume).
# A 20-step pretraining was tried first: its fine-tunes moved so far that every merge fell to ~60%.
_MNIST_PRETRAIN = {"epochs": 2, "batch_size": 256, "lr": 0.01, "schedule": "cosine"}
_MNIST_FINETUNE = {"epochs": 1, "batch_size": 256, "lr": 0.002, "schedule": "cosine"}


@register_pool(
    "multimnist-lenet",
    paper="Sener & Koltun, Multi-Task Learning as Multi-Objective Optimization, NeurIPS 2018 (Multi-MNIST, LeNet)",
    description="LeNet shared-bottom pretrained on Multi-MNIST (left+right), fine-tuned per digit",
    seed=0,
    n_train=20000,
    n_val=2000,
    n_test=None,
    pretrain=None,
    finetune=None,
)
def _multimnist_pool(seed: int, n_train: int, n_val: int, n_test: int | None, pretrain: Any, finetune: Any) -> Pool:
    data_params = {"n_train": n_train, "n_val": n_val}
    if n_test is not None:
        data_params["n_test"] = n_test
    folder = build_finetune_pool(
        dataset="multi-mnist",
        data_params=data_params,
        model="shared-bottom",
        pretrain={**_MNIST_PRETRAIN, **(pretrain or {})},
        finetune={**_MNIST_FINETUNE, **(finetune or {})},
        seed=seed,
    )
    return CheckpointPool(folder)


def _glue_root(path: str | None) -> Path:
    if path is not None:
        return Path(path).expanduser()
    from polytask.data import cache_dir

    found = sorted((cache_dir() / "merge_glue").glob("*/cola/encoder.safetensors"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(
            f"no MiniLM GLUE fine-tunes under {cache_dir() / 'merge_glue'}: run "
            "`python benchmarks/merge_glue.py --stage finetune` first, or give the pool a 'path'"
        )
    return found[-1].parent.parent


@register_pool(
    "glue-minilm",
    paper="Wang et al., GLUE, ICLR 2019; all-MiniLM-L6-v2 fine-tuned per task by benchmarks/merge_glue.py",
    description="MiniLM fine-tuned on CoLA, SST-2, MRPC, RTE, STS-B (merge_glue.py's cache), scored on GLUE dev",
    path=None,
    tasks=("cola", "sst2", "mrpc", "rte", "stsb"),
    max_train=1500,
    val_size=200,
    max_dev=None,
    max_length=128,
    seed=0,
    encoder=None,
    data_root=None,
)
def _glue_pool(
    path: str | None, tasks: Sequence[str], encoder: str | None, data_root: str | None, **settings: Any
) -> Pool:
    """``max_train``, ``val_size``, ``max_length``, ``seed``: those merge_glue.py fine-tuned with (its
    defaults); ``encoder``: the base encoder's Hugging Face folder (default MiniLM); ``data_root``: the
    folder holding ``glue/`` (default ``POLYTASK_DATA``)."""
    return GluePool(_glue_root(path), list(tasks), encoder_path=encoder, data_root=data_root, **settings)


def open_pool(spec: Mapping[str, Any], base_dir: Path | None = None) -> Pool:
    """The pool of a suite's ``pool:`` entry: ``{"name": builder, "params": {...}}`` or ``{"path": folder}``."""
    if spec.get("path"):
        p = Path(str(spec["path"])).expanduser()
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        return CheckpointPool(p)
    builder, params = POOLS.resolve(str(spec["name"]), spec.get("params") or {})
    return builder(**params)
