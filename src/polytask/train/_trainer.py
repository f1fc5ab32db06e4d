"""The training loop: balancer-driven steps, selection on validation, checkpoints and resume.

Mini-batches are gathered from in-memory tensors with one index tensor per batch. Each epoch writes
one JSON line to ``metrics.jsonl`` and then an atomic ``last`` checkpoint holding everything needed
to continue bit-for-bit: weights, optimiser and scheduler state, balancer state, both RNG states,
the early-stopping counters and the history. The best epoch on the validation split (never the
test split) is kept as the ``best`` checkpoint; independent single-task models keep a best epoch
per task.

For balancers that form the task-gradient Gramian or Jacobian anyway, each epoch's line also holds
the mean task-gradient cosine-similarity matrix (``grad_cosine``) and gradient norms (``grad_norm``),
read from what the engine already computed. Under ``torchrun`` the trainer runs data-parallel
(:mod:`polytask.train._distributed`): rank 0 alone evaluates, logs and writes checkpoints.

The model and balancer live on the trainer's device (``auto``: the GPU when there is one); the
splits stay in host memory and each mini-batch is copied over when it is drawn, so a table larger
than the GPU's memory still trains. Checkpoints always hold CPU tensors, so a run trained on a GPU
resumes, evaluates and predicts on a CPU-only machine and the other way round.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from polytask.balance import Balancer, GradientEngine, build_balancer
from polytask.balance._capture import capture_linear
from polytask.balance.fmtl import FMTL
from polytask.data._bundle import DataBundle
from polytask.data._tensors import Batch, TaskTensors
from polytask.evaluate.metrics import compute_metrics, primary_score
from polytask.nn._base import MultiTaskModel
from polytask.tasks import Task
from polytask.train import _distributed
from polytask.train._checkpoint import atomic_write_text, load_checkpoint, save_checkpoint
from polytask.train._device import resolve_device

__all__ = ["FitResult", "NonFiniteLossError", "TrainConfig", "Trainer", "evaluate_model", "predict_model"]

SCHEDULES = ("constant", "cosine", "linear", "step")
TEXT_EVAL_ROWS = 256  # rows per evaluation chunk for token inputs (see predict_model)


class NonFiniteLossError(RuntimeError):
    """A task loss became NaN or infinite; training stopped and the last good checkpoint was kept."""


@dataclass
class TrainConfig:
    """Optimisation and selection settings (all saved with the run)."""

    epochs: int = 20
    batch_size: int = 256
    lr: float = 1e-3
    weight_decay: float = 1e-4
    schedule: str = "constant"
    warmup_steps: int = 0
    step_gamma: float = 0.5
    step_every: int = 10
    grad_clip: float | None = None
    patience: int | None = 5
    min_delta: float = 0.0
    seed: int = 0
    eval_batch_size: int = 4096
    max_steps_per_epoch: int | None = None

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule '{self.schedule}'; valid: {', '.join(SCHEDULES)}")
        for name in ("epochs", "batch_size", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class FitResult:
    best_epoch: int | dict[str, int]
    val: dict[str, dict[str, float]]
    test: dict[str, dict[str, float]] | None
    history: list[dict[str, Any]] = field(default_factory=list)
    seconds_per_epoch: float = float("nan")


def _lr_lambda(cfg: TrainConfig, steps_per_epoch: int) -> Callable[[int], float]:
    total = steps_per_epoch * cfg.epochs

    def f(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        s = step - cfg.warmup_steps
        n = max(1, total - cfg.warmup_steps)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(s, n) / n))
        if cfg.schedule == "linear":
            return max(0.0, 1.0 - s / n)
        if cfg.schedule == "step":
            return cfg.step_gamma ** ((step // steps_per_epoch) // max(1, cfg.step_every))
        return 1.0

    return f


def _model_device(model: Any) -> torch.device:
    """Where ``model``'s parameters live (CPU for models without any, e.g. tree ensembles)."""
    params = model.parameters() if isinstance(model, nn.Module) else iter(())
    first = next(iter(params), None)
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()
def predict_model(model: MultiTaskModel, x: dict[str, torch.Tensor], batch_size: int = 4096) -> dict[str, torch.Tensor]:
    """Raw model outputs for all rows of ``x`` (eval mode, batched), as CPU tensors.

    Each chunk of ``x`` is moved to the model's device, so the inputs may stay in host memory."""
    was_training = model.training
    model.eval()
    device = _model_device(model)
    if "input_ids" in x:
        # Text: attention memory grows with rows x length^2 (4,096 rows of 128 tokens through a small
        # encoder took several GB), so token sequences are evaluated a few hundred rows at a time.
        batch_size = min(batch_size, TEXT_EVAL_ROWS)
    n = next(iter(x.values())).shape[0]
    outs: dict[str, list[torch.Tensor]] = {t: [] for t in model.task_names}
    for start in range(0, n, batch_size):
        part = model({k: v[start : start + batch_size].to(device, non_blocking=True) for k, v in x.items()})
        for t in outs:
            outs[t].append(part[t].cpu())
    model.train(was_training)
    return {t: torch.cat(v) if v else torch.empty(0, device="cpu") for t, v in outs.items()}


def evaluate_model(
    model: MultiTaskModel, data: TaskTensors, tasks: list[Task], batch_size: int = 4096
) -> dict[str, dict[str, float]]:
    preds = predict_model(model, data.x, batch_size)
    return {t.name: compute_metrics(t, preds[t.name], data.y[t.name], data.mask[t.name]) for t in tasks}


class _Progress:
    """A rich progress bar on a terminal; silent otherwise."""

    def __init__(self, enabled: bool) -> None:
        self.bar = None
        if enabled and sys.stderr.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                transient=True,
            )

    def __enter__(self) -> _Progress:
        if self.bar is not None:
            self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.stop()

    def epoch(self, epoch: int, total: int) -> Any:
        return None if self.bar is None else self.bar.add_task(f"epoch {epoch}", total=total)

    def advance(self, handle: Any, description: str | None = None) -> None:
        if self.bar is not None and handle is not None:
            self.bar.update(handle, advance=1, description=description)

    def done(self, handle: Any) -> None:
        if self.bar is not None and handle is not None:
            self.bar.remove_task(handle)


class Trainer:
    """Trains one model on one :class:`DataBundle` with one balancer.

    Args:
        model: the architecture.
        data: the splits and tasks.
        balancer: a :class:`Balancer` or a registered name (default: equal weighting).
        config: optimisation and selection settings.
        run_dir: where metrics, checkpoints and results go (``None``: keep everything in memory).
        progress: show a progress bar when stderr is a terminal.
        run_meta: extra JSON-serialisable facts saved with the checkpoint (data source, model
            name and parameters, ...), needed to rebuild the model for ``evaluate``/``predict``.
        device: ``auto`` (the GPU when torch sees one), ``cpu``, ``cuda``, ``cuda:N`` or ``mps``.
            The model and balancer are moved there (in place); the training device is not a
            training setting: a run may resume on another device.

    Under torchrun, or whenever a ``torch.distributed`` process group with several processes is
    initialised, training is data-parallel: ``config.batch_size`` is the global batch, split across
    the ranks (``docs/distributed.md``).
    """

    def __init__(
        self,
        model: MultiTaskModel,
        data: DataBundle,
        balancer: Balancer | str = "equal",
        config: TrainConfig | None = None,
        run_dir: Path | str | None = None,
        progress: bool = True,
        run_meta: dict[str, Any] | None = None,
        device: str | torch.device | None = "auto",
    ) -> None:
        self.device = resolve_device(device)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)  # nccl and DDP bind each process to its own GPU
        self.model = model.to(self.device)
        self.data = data
        self.tasks = list(data.tasks)
        if [t.name for t in self.tasks] != model.task_names:
            raise ValueError(f"model tasks {model.task_names} differ from data tasks {[t.name for t in self.tasks]}")
        self.balancer = build_balancer(balancer, self.tasks) if isinstance(balancer, str) else balancer
        self.balancer.to(self.device)
        self.config = config or TrainConfig()
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.progress = progress
        self.run_meta = dict(run_meta or {})
        shared_names = set(model.shared_parameter_names())
        named = list(model.named_parameters())
        self._shared = [p for n, p in named if n in shared_names]
        self._specific = [p for n, p in named if n not in shared_names]
        decay = [p for p in model.parameters() if p.requires_grad]
        groups: list[dict[str, Any]] = [{"params": decay, "weight_decay": self.config.weight_decay}]
        bal_params = [p for p in self.balancer.parameters() if p.requires_grad]
        if bal_params:
            # Balancer weights (e.g. log-variances) are not regularised towards zero.
            groups.append({"params": bal_params, "weight_decay": 0.0})
        self.optimizer = torch.optim.AdamW(groups, lr=self.config.lr)
        n = len(data.train)
        steps = math.ceil(n / self.config.batch_size)
        if self.config.max_steps_per_epoch:
            steps = min(steps, self.config.max_steps_per_epoch)
        self.steps_per_epoch = steps
        self.aux_loss_sum = 0.0  # the architecture's auxiliary loss, summed over this epoch's steps
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, _lr_lambda(self.config, steps))
        self.sampler = torch.Generator().manual_seed(self.config.seed)
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.best_score: dict[str, float] = {}
        self.best_epoch: dict[str, int] = {}
        self.best_state: dict[str, torch.Tensor] | None = None
        self.bad_epochs = 0
        self._reset_grad_stats()
        # Under torchrun (WORLD_SIZE > 1) this joins the process group if nobody has yet.
        self.dist = _distributed.init_from_env(self.device)
        self.ddp: DistributedDataParallel | None = None
        if self.dist is not None:
            if self.balancer.level == "representation" or isinstance(self.balancer, FMTL):
                raise ValueError(
                    "this balancer reads per-sample representation gradients or perturbed losses, which "
                    "data-parallel training does not combine across processes yet; use a loss- or "
                    "gradient-level balancer (see polytask balancers), or train in one process"
                )
            # Unused parameters (e.g. gated-off experts) must not stall DDP's reduction.
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.ddp = DistributedDataParallel(model, device_ids=ids, find_unused_parameters=True)

    @property
    def is_main(self) -> bool:
        """True in a one-process run and on rank 0 of a distributed one (the rank that writes)."""
        return self.dist is None or self.dist.is_main

    def _reset_grad_stats(self) -> None:
        self._cos_sum: torch.Tensor | None = None
        self._norm_sum: torch.Tensor | None = None
        self._stat_steps = 0

    # ------------------------------------------------------------------ state
    @property
    def _selection_keys(self) -> list[str]:
        return self.model.task_names if self.model.independent else ["all"]

    def _optimizer_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        sd = self.optimizer.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        scalars: dict[str, dict[str, Any]] = {}
        for pid, st in sd["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"optim.{pid}.{k}"] = v
                else:
                    scalars.setdefault(str(pid), {})[k] = v
        return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}

    def _load_optimizer(self, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        state: dict[int, dict[str, Any]] = {}
        for key, v in tensors.items():
            if key.startswith("optim."):
                _, pid, name = key.split(".", 2)
                state.setdefault(int(pid), {})[name] = v
        for pid, sc in meta["scalars"].items():
            state.setdefault(int(pid), {}).update(sc)
        self.optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})

    def _meta(self) -> dict[str, Any]:
        return {
            "tasks": [t.to_dict() for t in self.tasks],
            "input_spec": self.data.input_spec.to_dict(),
            "encoder": self.data.encoder.to_dict() if self.data.encoder is not None else None,
            "train_config": self.config.to_dict(),
            **self.run_meta,
        }

    def _save_last(self) -> None:
        assert self.run_dir is not None
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items()}
        tensors.update({f"balancer.{k}": v for k, v in self.balancer.state_dict().items()})
        opt_tensors, opt_meta = self._optimizer_tensors()
        tensors.update(opt_tensors)
        tensors["rng.torch"] = torch.get_rng_state()
        tensors["rng.sampler"] = self.sampler.get_state()
        if self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        meta = self._meta()
        meta["trainer_state"] = {
            "epoch": self.epoch,
            "history": self.history,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "bad_epochs": self.bad_epochs,
            "optimizer": opt_meta,
            "scheduler": self.scheduler.state_dict(),
        }
        save_checkpoint(self.run_dir / "checkpoints", "last", tensors, meta)

    def _save_best(self) -> None:
        if self.run_dir is None or self.best_state is None:
            return
        meta = self._meta()
        meta["best_epoch"] = self.best_epoch
        save_checkpoint(
            self.run_dir / "checkpoints", "best", {f"model.{k}": v for k, v in self.best_state.items()}, meta
        )

    def resume(self) -> bool:
        """Continue from ``run_dir/checkpoints/last``; returns False when there is nothing to resume."""
        if self.run_dir is None:
            raise ValueError("resume needs a run directory")
        last = self.run_dir / "checkpoints" / "last.json"
        if not last.exists():
            return False
        tensors, meta = load_checkpoint(last)
        saved_cfg = meta.get("train_config", {})
        if saved_cfg and saved_cfg != self.config.to_dict():
            diff = sorted(k for k in saved_cfg if saved_cfg[k] != self.config.to_dict().get(k))
            raise ValueError(f"cannot resume {self.run_dir}: training settings differ from the saved run in {diff}")
        self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
        self.balancer.load_state_dict({k[9:]: v for k, v in tensors.items() if k.startswith("balancer.")})
        # A balancer may re-create a buffer from the (CPU) checkpoint tensor when its shape changed.
        self.balancer.to(self.device)
        st = meta["trainer_state"]
        self._load_optimizer(tensors, st["optimizer"])
        self.scheduler.load_state_dict(st["scheduler"])
        torch.set_rng_state(tensors["rng.torch"])
        self.sampler.set_state(tensors["rng.sampler"])
        if self.device.type == "cuda" and "rng.cuda" in tensors:
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        self.epoch = int(st["epoch"])
        self.history = list(st["history"])
        self.best_score = {k: float(v) for k, v in st["best_score"].items()}
        self.best_epoch = {k: int(v) for k, v in st["best_epoch"].items()}
        self.bad_epochs = int(st["bad_epochs"])
        best = self.run_dir / "checkpoints" / "best.json"
        if best.exists():
            bt, _ = load_checkpoint(best)
            self.best_state = {k[6:]: v for k, v in bt.items() if k.startswith("model.")}
        # The metrics log may hold a line for an epoch whose checkpoint never landed: drop it.
        self._write_history_log()
        return True

    def _write_history_log(self) -> None:
        if self.run_dir is not None and self.is_main:
            atomic_write_text(self.run_dir / "metrics.jsonl", "".join(json.dumps(h) + "\n" for h in self.history))

    # ------------------------------------------------------------------ loop
    def step(self, batch: Batch, step: int = 0) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
        """One optimisation step on ``batch``: forward, balancer, clipping, optimiser and schedule.

        Returns the (detached) task losses and the weights the balancer applied.
        """
        if self.device.type != "cpu":
            batch = batch.to(self.device, non_blocking=True)
        ddp_sync = self.ddp is not None and self.balancer.level == "loss"
        if self.balancer.level == "gradient":
            # Record shared linear layers so the engine can build Gramians layer by layer. Under DDP
            # the module is called directly: the engine averages the per-task gradients itself.
            with capture_linear(self.model, self._shared) as captures:
                preds, reps = self.model.forward_with_representation(batch.x)
        elif ddp_sync:
            assert self.ddp is not None
            captures, reps = None, []
            preds = self.ddp(batch.x)  # DDP's forward arms its gradient all-reduce for the backward
        else:
            captures = None
            preds, reps = self.model.forward_with_representation(batch.x)
        losses = {t.name: t.loss(preds[t.name], batch.y[t.name], batch.mask[t.name]) for t in self.tasks}
        if self.dist is not None:
            losses = self._global_losses(losses, batch)
        stacked = torch.stack([v.detach() for v in losses.values()])
        if not bool(torch.isfinite(stacked).all()):
            bad = [t for t, v in zip(losses, stacked.tolist(), strict=True) if not math.isfinite(v)]
            raise NonFiniteLossError(
                f"loss of task(s) {', '.join(repr(b) for b in bad)} became {stacked.tolist()} at epoch "
                f"{self.epoch + 1}, step {step + 1}; training stopped"
                + (f", last good checkpoint kept in {self.run_dir / 'checkpoints'}" if self.run_dir else "")
                + "; try a lower --lr or --grad-clip"
            )
        self.optimizer.zero_grad(set_to_none=True)
        aux = self.model.auxiliary_loss()
        aux_extra = None
        if aux is not None and aux.requires_grad:
            self.aux_loss_sum += float(aux.detach())
            if ddp_sync:
                # DDP reduces each parameter once per backward: join the one weighted backward.
                aux_extra = aux
            else:
                # First, keeping the graph: balancers then add the task gradients to these .grad values.
                aux.backward(retain_graph=True)

        def reforward() -> dict[str, torch.Tensor]:
            out = self.model(batch.x)
            return {t.name: t.loss(out[t.name], batch.y[t.name], batch.mask[t.name]) for t in self.tasks}

        engine = GradientEngine(
            losses, self._shared, self._specific, reps, captures, reforward, distributed=self.dist is not None
        )
        engine.extra_loss = aux_extra
        weights = self.balancer.backward(losses, engine)
        if self.dist is not None and not ddp_sync:
            # Task-specific gradients (and the auxiliary loss's) are still per rank. The shared ones are
            # already equal on every rank (the engine averaged the task gradients) unless a balancer drew
            # random numbers (e.g. GradDrop after uneven dropout): averaging them too keeps the replicas
            # identical whatever happens, and leaves equal values unchanged.
            params = self._specific + self._shared
            _distributed.all_reduce_mean([p.grad for p in params if p.grad is not None], self.dist)
        stats = engine.gradient_statistics()
        if stats is not None:
            cos, norms = stats
            self._cos_sum = cos if self._cos_sum is None else self._cos_sum + cos
            self._norm_sum = norms if self._norm_sum is None else self._norm_sum + norms
            self._stat_steps += 1
        if self.config.grad_clip:
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        return {t: v.detach() for t, v in losses.items()}, weights

    def _global_losses(self, losses: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
        """Losses whose values are the global batch's and whose gradients are this rank's share of it.

        The global loss of task k is ``sum_r n_r L_r / N`` (``n_r`` labels present on rank r). Scaling
        the local loss by ``world n_r / N`` makes the rank mean of the gradients (what DDP and the engine
        compute) the global batch's gradient; adding the detached difference to the all-reduced value
        makes every rank's balancer read the same global numbers.
        """
        assert self.dist is not None
        k = len(losses)
        counts = torch.stack([batch.mask[t].sum() for t in losses]).to(torch.float64)
        values = torch.stack([v.detach() for v in losses.values()]).to(torch.float64)
        buf = torch.cat([counts, counts * values])
        dist.all_reduce(buf)
        n, total = buf[:k], buf[k:]
        present = n > 0
        glob = torch.where(present, total / n.clamp_min(1.0), torch.zeros_like(n))
        scale = torch.where(present, self.dist.world_size * counts / n.clamp_min(1.0), torch.zeros_like(n))
        out = {}
        for i, (t, v) in enumerate(losses.items()):
            local = v * scale[i].to(v.dtype)
            out[t] = local + (glob[i].to(v.dtype) - local.detach())
        return out

    def _train_epoch(self, bar: _Progress) -> tuple[dict[str, float], dict[str, float]]:
        cfg = self.config
        data = self.data.train
        n = len(data)
        self.model.train()
        perm = torch.randperm(n, generator=self.sampler, device="cpu")  # indexes the host-side split
        loss_sum = {t.name: torch.zeros((), device=self.device) for t in self.tasks}
        weight_sum: dict[str, float] = {t.name: 0.0 for t in self.tasks}
        handle = bar.epoch(self.epoch + 1, self.steps_per_epoch)
        steps = 0
        for step in range(self.steps_per_epoch):
            idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            if idx.numel() == 0:
                break
            losses, weights = self.step(data.take(_distributed.shard(idx, self.dist)), step)
            for t, v in losses.items():
                loss_sum[t] += v.detach()
                weight_sum[t] += float(weights.get(t, 0.0))
            steps += 1
            bar.advance(handle)
        bar.done(handle)
        steps = max(steps, 1)
        return {t: float(v) / steps for t, v in loss_sum.items()}, {t: w / steps for t, w in weight_sum.items()}

    def _select(self, val: dict[str, dict[str, float]]) -> bool:
        """Update the best state from this epoch's validation metrics; True if anything improved."""
        improved_keys = []
        for key in self._selection_keys:
            tasks = self.tasks if key == "all" else [t for t in self.tasks if t.name == key]
            score = primary_score(tasks, {t.name: val[t.name] for t in tasks})
            if math.isnan(score):
                continue
            if key not in self.best_score or score > self.best_score[key] + self.config.min_delta:
                self.best_score[key] = score
                self.best_epoch[key] = self.epoch
                improved_keys.append(key)
        if not improved_keys:
            return False
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if self.best_state is None or "all" in improved_keys:
            self.best_state = state
        else:
            for key in improved_keys:
                for name in self.model.task_state_keys(key):
                    self.best_state[name] = state[name]
        return True

    def fit(self, resume: bool = False) -> FitResult:
        """Train until ``epochs`` or early stopping; returns best-epoch validation and test metrics."""
        if self.run_dir is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if resume:
                self.resume()
            elif (self.run_dir / "checkpoints" / "last.json").exists():
                raise FileExistsError(
                    f"{self.run_dir} already holds a run; pass --resume to continue it or choose another --output"
                )
        cfg = self.config
        with _Progress(self.progress and self.is_main) as bar:
            while self.epoch < cfg.epochs:
                if cfg.patience is not None and self.bad_epochs >= cfg.patience:
                    break
                self._reset_grad_stats()
                t0 = time.perf_counter()
                train_loss, weights = self._train_epoch(bar)
                seconds = time.perf_counter() - t0
                self.epoch += 1
                self.balancer.epoch_end(self.epoch, train_loss)
                aux_mean, self.aux_loss_sum = self.aux_loss_sum / max(self.steps_per_epoch, 1), 0.0
                if not self.is_main:
                    # Rank 0 evaluates and writes; the others learn whether to stop and wait for it.
                    self._sync_bad_epochs()
                    continue
                self.model.reset_diagnostics()
                val = evaluate_model(self.model, self.data.val, self.tasks, cfg.eval_batch_size)
                improved = self._select(val)
                self.bad_epochs = 0 if improved else self.bad_epochs + 1
                record = {
                    "epoch": self.epoch,
                    "seconds": round(seconds, 4),
                    "lr": self.optimizer.param_groups[0]["lr"],
                    "train_loss": train_loss,
                    "weights": weights,
                    "val": val,
                    "best_epoch": dict(self.best_epoch),
                }
                if aux_mean:
                    record["aux_loss"] = aux_mean
                record.update(self._grad_stats_record())
                diag = self.model.diagnostics()
                if diag:
                    record["diagnostics"] = diag
                self.history.append(record)
                if self.run_dir is not None:
                    with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                        f.write(json.dumps(record) + "\n")
                    if improved:
                        self._save_best()
                    self._save_last()
                self._sync_bad_epochs()
        return self.finish()

    def _sync_bad_epochs(self) -> None:
        """Rank 0's early-stopping counter to every rank (after its checkpoint is written)."""
        if self.dist is None:
            return
        t = torch.tensor([self.bad_epochs], dtype=torch.int64, device=self.device)  # nccl: a GPU tensor
        dist.broadcast(t, src=0)
        self.bad_epochs = int(t)

    def _grad_stats_record(self) -> dict[str, Any]:
        """This epoch's mean task-gradient cosine matrix and norms (empty when none were formed)."""
        if self._cos_sum is None or self._norm_sum is None or not self._stat_steps:
            return {}
        names = [t.name for t in self.tasks]
        cos = (self._cos_sum / self._stat_steps).tolist()
        norms = (self._norm_sum / self._stat_steps).tolist()
        return {
            "grad_cosine": {a: {b: round(cos[i][j], 6) for j, b in enumerate(names)} for i, a in enumerate(names)},
            "grad_norm": {a: norms[i] for i, a in enumerate(names)},
        }

    def finish(self) -> FitResult:
        """Load the best weights, evaluate on val and test, write ``results.json``.

        In a distributed run only rank 0 evaluates; the other ranks return empty metrics."""
        if not self.is_main:
            _distributed.barrier(self.dist)
            return FitResult(self.best_epoch.get("all", 0), {}, None, [], float("nan"))
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        cfg = self.config
        val = evaluate_model(self.model, self.data.val, self.tasks, cfg.eval_batch_size)
        test = (
            evaluate_model(self.model, self.data.test, self.tasks, cfg.eval_batch_size)
            if self.data.test is not None
            else None
        )
        secs = [h["seconds"] for h in self.history]
        spe = sorted(secs)[len(secs) // 2] if secs else float("nan")
        best: int | dict[str, int] = (
            self.best_epoch.get("all", 0) if not self.model.independent else dict(self.best_epoch)
        )
        result = FitResult(best, val, test, list(self.history), spe)
        if self.run_dir is not None:
            doc = {
                "data": self.data.name,
                "tasks": [t.to_dict() for t in self.tasks],
                "best_epoch": best,
                "epochs_run": self.epoch,
                "seconds_per_epoch": spe,
                "device": str(self.device),
                "world_size": 1 if self.dist is None else self.dist.world_size,
                "val": val,
                "test": test,
                **self.run_meta,
            }
            atomic_write_text(self.run_dir / "results.json", json.dumps(doc, indent=1))
        _distributed.barrier(self.dist)
        return result
