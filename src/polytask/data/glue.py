"""GLUE small tasks from the official TSV files, as texts + labels and as a task-column bundle.

Wang et al., "GLUE: A Multi-Task Benchmark and Analysis Platform for Natural Language
Understanding", ICLR 2019. Five tasks are supported, read from ``<data dir>/glue/<Folder>/{train,dev}.tsv``
in the layout the benchmark distributes (tab-separated, no quoting; quotes are part of the text):

=========  ========  ==================================  ==========  =========================
task       folder    text column(s)                      kind        GLUE metric(s)
=========  ========  ==================================  ==========  =========================
``cola``   CoLA      4th column (no header)              binary      Matthews corr. (``mcc``)
``sst2``   SST-2     ``sentence``                        binary      accuracy
``mrpc``   MRPC      ``#1 String``, ``#2 String``        binary      F1, accuracy
``rte``    RTE       ``sentence1``, ``sentence2``        binary      accuracy
``stsb``   STS-B     ``sentence1``, ``sentence2``        regression  Pearson, Spearman
=========  ========  ==================================  ==========  =========================

RTE's positive class is ``entailment``. GLUE test files carry no labels, so the labelled ``dev`` file
plays the role of the test split, and validation (model selection, merging coefficients) uses a
held-out slice of ``train``: nothing is ever chosen on ``dev``.

:func:`glue_bundle` tokenizes with a caller-given Hugging Face tokenizer (this module imports no
model code) into the *task-column* layout: every row belongs to one task, whose mask is True there;
the other tasks' labels are missing (``-1`` for classification, NaN for regression).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polytask.data._bundle import DataBundle, register_dataset
from polytask.data._datadir import data_dir, resolve
from polytask.data._hf import load_tokenizer
from polytask.data._tensors import InputSpec, TaskTensors
from polytask.tasks import Task, TaskKind

__all__ = [
    "GLUE_METRICS",
    "GLUE_TASKS",
    "GlueExamples",
    "GlueTaskInfo",
    "glue_bundle",
    "glue_task",
    "read_glue",
    "read_glue_tsv",
]

# sha256 of the mirrored files (from the data dir's SHA256SUMS); files elsewhere are read unverified.
_SHA256: dict[str, str] = {
    "glue/CoLA/dev.tsv": "8c013e21dc39957cac37378d87bebe225b694a0d5fe13eded66c2856628833fd",
    "glue/CoLA/train.tsv": "cb368ebeb9f27d7ad03720d27ddc95687a311bdb100781a2fe59a5f5b1bc0624",
    "glue/MRPC/dev.tsv": "9e8f284788040f7c9ecde2e1b3c07237c756f926bd9ef8548ef5d34b56f69f17",
    "glue/MRPC/train.tsv": "f178bcc72ab4c2c1c778b480912e0c8e1dba3ead150dc1d490d70682ab888c1e",
    "glue/RTE/dev.tsv": "80230dfa1347282e7b532b06a1004a76a710087541189bf874223ddf0e3819fb",
    "glue/RTE/train.tsv": "41e3a9b063433392343fad9e962cf2f58b681c78d8f71592f4186f0837246c5c",
    "glue/SST-2/dev.tsv": "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0",
    "glue/SST-2/train.tsv": "48eac26399f8456935f81dd9e3a745c1430adb6c62e233ccfe22db4a0d15d1d1",
    "glue/STS-B/dev.tsv": "fe7dc0632a5033562f3cadff991f6e8d9b9b6311861660e78c3c82eb7db67f59",
    "glue/STS-B/train.tsv": "41c4d978b6162abdcada7e49a982211954cca5459c228db478af333124b257a2",
}


@dataclass(frozen=True)
class GlueTaskInfo:
    """Where a GLUE task's columns are: by header name, or by position for header-less files."""

    folder: str
    kind: TaskKind
    text: tuple[str | int, ...]
    label: str | int
    header: bool = True
    classes: tuple[str, ...] = ("0", "1")


GLUE_TASKS: dict[str, GlueTaskInfo] = {
    "cola": GlueTaskInfo("CoLA", TaskKind.BINARY, (3,), 1, header=False),
    "sst2": GlueTaskInfo("SST-2", TaskKind.BINARY, ("sentence",), "label"),
    "mrpc": GlueTaskInfo("MRPC", TaskKind.BINARY, ("#1 String", "#2 String"), "Quality"),
    "rte": GlueTaskInfo(
        "RTE", TaskKind.BINARY, ("sentence1", "sentence2"), "label", classes=("not_entailment", "entailment")
    ),
    "stsb": GlueTaskInfo("STS-B", TaskKind.REGRESSION, ("sentence1", "sentence2"), "score", classes=()),
}

# The official metric(s) per task, first one the task's GLUE score (names of polytask.evaluate.metrics).
GLUE_METRICS: dict[str, tuple[str, ...]] = {
    "cola": ("mcc",),
    "sst2": ("accuracy",),
    "mrpc": ("f1", "accuracy"),
    "rte": ("accuracy",),
    "stsb": ("pearson", "spearman"),
}


@dataclass
class GlueExamples:
    """One split of one task: first (and second) texts and float labels (class index or score)."""

    task: str
    text_a: list[str]
    text_b: list[str] | None
    label: np.ndarray

    def __len__(self) -> int:
        return len(self.text_a)

    def take(self, index: Sequence[int] | np.ndarray) -> GlueExamples:
        idx = [int(i) for i in index]
        return GlueExamples(
            self.task,
            [self.text_a[i] for i in idx],
            None if self.text_b is None else [self.text_b[i] for i in idx],
            self.label[idx],
        )


def _info(task: str) -> GlueTaskInfo:
    if task not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task '{task}'; available: {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[task]


def read_glue_tsv(path: str | Path, task: str) -> GlueExamples:
    """Read one GLUE TSV file of ``task``; a malformed file raises a one-line ``ValueError``."""
    info = _info(task)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GLUE file not found: {path}")
    lines = path.read_text(encoding="utf-8-sig").splitlines()  # MRPC starts with a byte-order mark
    rows = [line.split("\t") for line in lines if line.strip()]
    if info.header:
        if not rows:
            raise ValueError(f"{path}: empty file; expected a header with {list(info.text)} and '{info.label}'")
        header, rows = rows[0], rows[1:]
        cols: list[int] = []
        for name in (*info.text, info.label):
            if name not in header:
                raise ValueError(f"{path}: no column '{name}' for GLUE task '{task}'; header has {header}")
            cols.append(header.index(str(name)))
        width = len(header)
    else:
        cols = [int(c) for c in (*info.text, info.label)]
        width = max(cols) + 1
    text_cols, label_col = cols[:-1], cols[-1]
    a: list[str] = []
    b: list[str] = []
    labels: list[float] = []
    line0 = 2 if info.header else 1
    for i, r in enumerate(rows):
        if len(r) < width:
            raise ValueError(f"{path}, line {i + line0}: {len(r)} tab-separated fields, expected {width}")
        raw = r[label_col].strip()
        if info.kind is TaskKind.REGRESSION:
            try:
                value = float(raw)
            except ValueError:
                raise ValueError(f"{path}, line {i + line0}: score '{raw}' is not a number") from None
        elif raw in info.classes:
            value = float(info.classes.index(raw))
        else:
            raise ValueError(f"{path}, line {i + line0}: label '{raw}' is not one of {list(info.classes)}")
        a.append(r[text_cols[0]])
        if len(text_cols) > 1:
            b.append(r[text_cols[1]])
        labels.append(value)
    if not labels:
        raise ValueError(f"{path}: no examples for GLUE task '{task}'")
    return GlueExamples(task, a, b if len(text_cols) > 1 else None, np.asarray(labels, dtype=np.float32))


def read_glue(task: str, split: str, root: str | Path | None = None) -> GlueExamples:
    """``task``'s ``split`` (``train`` or ``dev``) from ``root`` (default: the data dir), sha256-checked."""
    info = _info(task)
    if split not in ("train", "dev"):
        raise ValueError(f"GLUE split must be 'train' or 'dev', got '{split}'")
    rel = f"glue/{info.folder}/{split}.tsv"
    base = Path(root) if root is not None else data_dir()
    path = resolve(rel, _SHA256.get(rel) if root is None else None, root=base)
    return read_glue_tsv(path, task)


def glue_task(task: str, train_labels: np.ndarray | None = None) -> Task:
    """The :class:`Task` of a GLUE task; regression is standardised with the training labels' mean/std."""
    info = _info(task)
    if info.kind is TaskKind.REGRESSION:
        if train_labels is None or len(train_labels) < 2:
            return Task(task, info.kind)
        std = float(np.std(train_labels))
        return Task(task, info.kind, y_mean=float(np.mean(train_labels)), y_std=std if std > 0 else 1.0)
    return Task(task, info.kind, classes=info.classes)


Tokenizer = Callable[..., Any]


def _tokenize(tokenizer: Tokenizer, ex: GlueExamples, max_length: int) -> dict[str, torch.Tensor]:
    enc = tokenizer(
        ex.text_a,
        ex.text_b,
        padding="max_length",
        truncation=True,
        max_length=max_length,
        return_tensors="pt",
    )
    return {k: enc[k].long() for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}


def _task_column(
    parts: dict[str, GlueExamples], tasks: list[Task], tokenizer: Tokenizer, max_length: int
) -> TaskTensors:
    xs: list[dict[str, torch.Tensor]] = []
    n_total = sum(len(p) for p in parts.values())
    y: dict[str, torch.Tensor] = {}
    mask: dict[str, torch.Tensor] = {}
    for t in tasks:
        fill = float("nan") if t.kind is TaskKind.REGRESSION else -1.0
        y[t.name] = torch.full((n_total,), fill)
        mask[t.name] = torch.zeros(n_total, dtype=torch.bool)
    start = 0
    row_task = torch.empty(n_total, dtype=torch.long)
    for k, t in enumerate(tasks):
        ex = parts[t.name]
        xs.append(_tokenize(tokenizer, ex, max_length))
        sl = slice(start, start + len(ex))
        y[t.name][sl] = torch.from_numpy(ex.label)
        mask[t.name][sl] = True
        row_task[sl] = k
        start += len(ex)
    x = {k: torch.cat([p[k] for p in xs]) for k in xs[0]}
    return TaskTensors(x, y, mask, {"row_task": row_task.tolist()})


def glue_bundle(
    tokenizer: Tokenizer,
    tasks: Sequence[str] = tuple(GLUE_TASKS),
    *,
    max_train: int | None = 4000,
    val_size: int = 200,
    max_dev: int | None = None,
    max_length: int = 128,
    seed: int = 0,
    root: str | Path | None = None,
    encoder: str = "",
) -> DataBundle:
    """A task-column :class:`DataBundle` of GLUE tasks: ``train`` (at most ``max_train`` rows per task,
    drawn at random with ``seed``), ``val`` (``val_size`` further training rows per task, disjoint from
    ``train``) and ``test`` (the ``dev`` file, first ``max_dev`` rows per task when given).

    Inputs ``input_ids``, ``attention_mask`` (and ``token_type_ids`` when the tokenizer makes them) are
    padded to ``max_length`` tokens; models may trim a batch to its longest row. ``encoder``: the Hugging
    Face folder of the tokenizer, recorded in the input spec for the models' text stems ("": MiniLM).
    """
    names = list(dict.fromkeys(tasks))
    for t in names:
        _info(t)
    if not names:
        raise ValueError(f"no GLUE task given; available: {', '.join(GLUE_TASKS)}")
    if val_size < 1:
        raise ValueError(f"val_size must be >= 1, got {val_size}")
    rng = np.random.default_rng(seed)
    train_parts, val_parts, dev_parts = {}, {}, {}
    for t in names:
        full = read_glue(t, "train", root)
        if len(full) <= val_size:
            raise ValueError(f"GLUE task '{t}': {len(full)} training rows, need more than val_size={val_size}")
        perm = rng.permutation(len(full))
        n_train = len(full) - val_size if max_train is None else min(max_train, len(full) - val_size)
        val_parts[t] = full.take(perm[:val_size])
        train_parts[t] = full.take(perm[val_size : val_size + n_train])
        dev = read_glue(t, "dev", root)
        dev_parts[t] = dev if max_dev is None else dev.take(range(min(max_dev, len(dev))))
    task_objs = [glue_task(t, train_parts[t].label) for t in names]
    splits = [_task_column(p, task_objs, tokenizer, max_length) for p in (train_parts, val_parts, dev_parts)]
    spec = InputSpec(kind="text", encoder=encoder)
    meta = {"max_train": max_train, "val_size": val_size, "max_length": max_length, "seed": seed}
    return DataBundle("glue", task_objs, spec, *splits, meta=meta)


@register_dataset(
    "glue",
    "GLUE: CoLA, SST-2, MRPC, RTE, STS-B in one task-column set (dev as the test split); text",
    "Wang et al., ICLR 2019; glue/ in the data mirror; tokenized with all-MiniLM-L6-v2's tokenizer by default",
)
def glue(
    seed: int = 0,
    data_dir: str | Path | None = None,
    tokenizer: str | Path | None = None,
    max_train: int | None = 4000,
    val_size: int = 200,
    max_dev: int | None = None,
    max_length: int = 128,
) -> DataBundle:
    """All five tasks (select some with ``--task``); ``tokenizer``: a Hugging Face folder (default:
    the installed all-MiniLM-L6-v2's, offline), which must match the model's encoder."""
    return glue_bundle(
        load_tokenizer(tokenizer),
        tuple(GLUE_TASKS),
        max_train=max_train,
        val_size=val_size,
        max_dev=max_dev,
        max_length=max_length,
        seed=seed,
        root=data_dir,
        encoder="" if tokenizer is None else str(Path(tokenizer).expanduser().resolve()),
    )
