"""The gradient engine: the one place that turns per-task losses into parameter gradients.

It is lazy. A loss-level balancer calls :meth:`GradientEngine.backward_weighted` and pays for one
ordinary backward pass of the weighted sum; nothing per task is computed. Gradient-level balancers
ask for :meth:`gramian` (K x K), :meth:`jacobian` (K x shared parameters) or
:meth:`representation_jacobian`, then hand back either weights (:meth:`apply_shared_weights`: the
shared parameters get ``J^T w``) or a direction (:meth:`apply_shared_direction`); task-specific
parameters always receive their own task's gradient.

Fast path. When the trainer captured the shared ``nn.Linear`` layers' inputs and outputs during the
forward pass (:func:`polytask.balance._capture.capture_linear`), the engine runs one batched
activation-gradient pass (``torch.autograd.grad(..., is_grads_batched=True)``, a vmap over the K
task losses) that yields each task's output gradient ``delta_k`` at every captured layer, and the
full per-task gradients of the remaining (non-linear-layer) shared parameters. Then, per layer with
input ``X`` (M rows) and deltas ``D_k``:

* Gramian: ``<dW_k, dW_l> = <D_k, (X X^T) D_l>``, computed either that way (cost ~ M^2 (in + K out))
  or by forming ``dW_k = D_k^T X`` (cost ~ K M out in), whichever is cheaper for the layer's shape;
* update: ``sum_k w_k dW_k = (sum_k w_k D_k)^T X``: one matmul, the weight-gradient pass of a
  single ordinary backward.

So an exact Gramian-based step costs one forward, one batched pass of K activation gradients and
one weight-gradient pass, against one forward and K full backward passes for the naive method.
Without captures the engine falls back to K ``autograd.grad`` calls (the reference the tests use).

Distributed data parallel (``distributed=True``): each rank's per-task gradient blocks are averaged
across ranks (one all-reduce) right after the pass, before any Gramian, Jacobian or direction is
formed; a sum of per-rank Gramians is not the Gramian of the averaged gradients. The layer kernels
(``X``, ``D``) are per-rank, so the engine then works from explicit ``dW_k`` blocks.

Gradient statistics: :meth:`GradientEngine.gradient_statistics` reads the Gramian or Jacobian a
balancer already asked for (never computing gradients of its own) and returns the task-gradient
cosine similarities and norms that the trainer logs per epoch.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import nn

from polytask.balance._capture import CapturedLinear

__all__ = ["GradientEngine", "NoSharedParametersError", "gradient_cosine"]

Weights = Mapping[str, float | torch.Tensor] | torch.Tensor | Sequence[float]


class NoSharedParametersError(ValueError):
    """A gradient-level balancer was used on a model that declares no shared parameters."""


def _batched_grads(
    losses: Sequence[torch.Tensor], inputs: Sequence[torch.Tensor], retain_graph: bool = True, vmap: bool = True
) -> list[torch.Tensor]:
    """Gradients of each of the K scalar ``losses`` with respect to each input: ``(K, *input.shape)``.

    ``vmap`` batches the K passes into one (larger matrix products); K ordinary passes are faster
    for small graphs (vmap has a fixed cost of a few ms) and for convolutions (measured on CPU).
    """
    k = len(losses)
    if not inputs:
        return []
    grads: Sequence[torch.Tensor | None] | None = None
    if vmap and all(loss.requires_grad for loss in losses):
        stacked = torch.stack(list(losses))
        eye = torch.eye(k, dtype=stacked.dtype, device=stacked.device)
        try:
            grads = torch.autograd.grad(
                stacked, inputs, grad_outputs=eye, is_grads_batched=True, retain_graph=retain_graph, allow_unused=True
            )
        except RuntimeError:  # an op without a vmap rule for its backward
            grads = None
    if grads is None:
        # Each loss on its own (not a slice of a stacked tensor, whose backward would send zero
        # gradients through every other task's graph).
        rows = [
            torch.autograd.grad(loss, inputs, retain_graph=True, allow_unused=True) if loss.requires_grad
            else (None,) * len(inputs)
            for loss in losses
        ]  # fmt: skip
        grads = [
            torch.stack([r[j] if r[j] is not None else torch.zeros_like(x) for r in rows]) for j, x in enumerate(inputs)
        ]
    return [
        g if g is not None else torch.zeros((k, *x.shape), dtype=x.dtype, device=x.device)
        for g, x in zip(grads, inputs, strict=True)
    ]


def gradient_cosine(gramian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities ``G_kl / sqrt(G_kk G_ll)`` (K, K) and norms ``sqrt(G_kk)`` (K,) of the task
    gradients behind ``gramian``; a task with a zero gradient has cosine 0 with every task (itself too)."""
    g = gramian.detach().to(torch.float64)
    norms = g.diagonal().clamp_min(0.0).sqrt()
    outer = norms[:, None] * norms[None, :]
    cos = torch.where(outer > 0, g / outer.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(g))
    return cos.clamp(-1.0, 1.0), norms


class _Layer:
    """A captured linear layer's stacked inputs ``X`` (M, in) and per-task output gradients ``D`` (K, M, out)."""

    def __init__(self, module: nn.Linear, x: torch.Tensor, deltas: torch.Tensor) -> None:
        self.module = module
        self.has_bias = module.bias is not None
        self.x = x
        self.d = deltas

    def per_task(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``dW_k`` (K, out, in) and ``db_k`` (K, out) for every task."""
        return torch.einsum("kmo,mi->koi", self.d, self.x), (self.d.sum(1) if self.has_bias else None)

    def gramian(self) -> torch.Tensor:
        k, m, out = self.d.shape
        width = self.x.shape[1] + self.has_bias
        cost_explicit = k * m * out * width + k * k * out * width
        cost_kernel = m * m * width + k * m * m * out + k * k * m * out
        if cost_explicit <= cost_kernel:
            dw, db = self.per_task()
            g = dw.reshape(k, -1)
            gram = g @ g.T
            return gram + db @ db.T if db is not None else gram
        # <dW_k, dW_l> + <db_k, db_l> = <D_k, (X X^T + 1) D_l>: one (M x M) @ (M x K*out) product,
        # then a (K x M*out) @ (M*out x K) one.
        kernel = self.x @ self.x.T
        if self.has_bias:
            kernel += 1.0
        mixed = torch.matmul(kernel, self.d)  # (K, M, out), batched over tasks: no transposed copies
        return self.d.reshape(k, m * out) @ mixed.reshape(k, m * out).T

    def combined(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``sum_k w_k dW_k`` (out, in) and ``sum_k w_k db_k`` (out,): the one weight-gradient pass."""
        dw = torch.einsum("k,kmo->mo", w.to(self.d.dtype), self.d)
        return dw.T @ self.x, (dw.sum(0) if self.has_bias else None)


class GradientEngine:
    """Per-step gradient computations for one set of task losses.

    Args:
        losses: scalar loss per task, all attached to one graph.
        shared: the shared parameters (those whose update balancers combine).
        specific: the task-specific parameters.
        representation: shared representation tensor(s) from the model's forward pass, for
            representation-level balancers.
        captures: shared linear layers recorded during the forward pass (enables the fast path).
        reforward: re-runs the model's forward pass on the same batch with the parameters' current
            values and returns fresh task losses (for methods that evaluate the losses at perturbed
            parameters, e.g. F-MTL); ``None`` when the caller cannot provide it.
        distributed: average the per-task shared gradients across the ranks of the default
            ``torch.distributed`` process group before they are used.
    """

    def __init__(
        self,
        losses: Mapping[str, torch.Tensor],
        shared: Sequence[nn.Parameter],
        specific: Sequence[nn.Parameter] = (),
        representation: Sequence[torch.Tensor] = (),
        captures: Sequence[CapturedLinear] | None = None,
        reforward: Callable[[], Mapping[str, torch.Tensor]] | None = None,
        distributed: bool = False,
    ) -> None:
        self.losses = dict(losses)
        self.distributed = distributed
        self.reforward = reforward
        # A regulariser that the next loss-level backward adds to the weighted sum (e.g. Rep-MTL's).
        self.extra_loss: torch.Tensor | None = None
        self.task_names = list(self.losses)
        self.shared = [p for p in shared if p.requires_grad]
        self.specific = [p for p in specific if p.requires_grad]
        self.representation = list(representation)
        self.captures = [c for c in (captures or []) if c.outputs]
        self._per_task: dict[int, torch.Tensor] | None = None  # id(param) -> (K, *shape), non-layer params
        self._layers: list[_Layer] | None = None
        self._specific_grads: list[torch.Tensor] | None = None
        self._rep_grads: list[torch.Tensor] | None = None
        self._jacobian: torch.Tensor | None = None
        self._gramian: torch.Tensor | None = None

    @property
    def n_tasks(self) -> int:
        return len(self.task_names)

    def _vector(self, weights: Weights) -> list:
        if isinstance(weights, Mapping):
            unknown = set(weights) - set(self.task_names)
            if unknown:
                raise KeyError(f"weights for unknown task(s) {sorted(unknown)}; tasks: {self.task_names}")
            return [weights.get(t, 0.0) for t in self.task_names]
        w = list(weights)
        if len(w) != self.n_tasks:
            raise ValueError(f"expected {self.n_tasks} weights, got {len(w)}")
        return w

    def _loss_list(self) -> list[torch.Tensor]:
        return [self.losses[t] for t in self.task_names]

    def _stacked_losses(self) -> torch.Tensor:
        return torch.stack([self.losses[t] for t in self.task_names])

    # -------------------------------------------------------------- loss level
    def weighted_loss(self, weights: Weights, extra: torch.Tensor | None = None) -> torch.Tensor:
        total = sum(w * self.losses[t] for w, t in zip(self._vector(weights), self.task_names, strict=True))
        for term in (extra, self.extra_loss):
            if term is not None:
                total = total + term
        return total  # type: ignore[return-value]

    def backward_weighted(
        self, weights: Weights, extra: torch.Tensor | None = None, own_weights: Weights | None = None
    ) -> None:
        """One ordinary backward pass of ``sum_k w_k L_k (+ extra + extra_loss)``; no per-task work.

        Every parameter, shared or task-specific, receives the weighted gradient, unless
        ``own_weights`` is given: then task-specific parameters get ``sum_k own_k grad L_k`` instead,
        from a second pass that only reaches them (through the task heads, not the trunk).
        """
        total = self.weighted_loss(weights, extra)
        if not (isinstance(total, torch.Tensor) and total.requires_grad):
            return
        if own_weights is None or not self.specific:
            total.backward()
            return
        inputs = [p for p in self.shared if p.requires_grad]
        if inputs:
            torch.autograd.backward(total, inputs=inputs, retain_graph=True)
        own = sum(w * self.losses[t] for w, t in zip(self._vector(own_weights), self.task_names, strict=True))
        if isinstance(own, torch.Tensor) and own.requires_grad:
            torch.autograd.backward(own, inputs=self.specific)

    # -------------------------------------------------------------- per-task gradients
    def _require_shared(self) -> None:
        if not self.shared:
            raise NoSharedParametersError(
                "this balancer needs per-task gradients of shared parameters, but the model declares none; "
                "use a loss-level balancer (e.g. --balancer equal) or a shared architecture"
            )

    def _pass(self) -> None:
        """The batched activation-gradient pass (fast path) or K full passes (reference path)."""
        if self._per_task is not None:
            return
        self._require_shared()
        layer_params = set()
        for c in self.captures:
            layer_params.add(id(c.module.weight))
            if c.module.bias is not None:
                layer_params.add(id(c.module.bias))
        others = [p for p in self.shared if id(p) not in layer_params]
        outputs = [y for c in self.captures for y in c.outputs]
        inputs = [*outputs, *others, *self.specific, *self.representation]
        # Batched passes pay off for linear layers, not for convolutions (see _batched_grads).
        grads = _batched_grads(self._loss_list(), inputs, vmap=not any(p.dim() > 2 for p in others))
        k = self.n_tasks
        pos = 0
        self._layers = []
        for c in self.captures:
            n = len(c.outputs)
            ds = grads[pos : pos + n]
            pos += n
            xs = [xi.reshape(-1, xi.shape[-1]) for xi in c.inputs]
            dl = [di.reshape(k, -1, di.shape[-1]) for di in ds]
            # A layer called once (the usual case) needs no copy.
            x = xs[0] if len(xs) == 1 else torch.cat(xs)
            d = dl[0] if len(dl) == 1 else torch.cat(dl, dim=1)
            self._layers.append(_Layer(c.module, x, d))
        self._per_task = {id(p): g for p, g in zip(others, grads[pos : pos + len(others)], strict=True)}
        pos += len(others)
        self._specific_grads = grads[pos : pos + len(self.specific)]
        pos += len(self.specific)
        self._rep_grads = grads[pos:]
        if self.distributed:
            self._average_across_ranks()

    def _average_across_ranks(self) -> None:
        """Replace this rank's per-task shared gradients by their mean over all ranks (one all-reduce).

        Layer kernels cannot be averaged (each rank has its own rows), so every layer becomes explicit
        ``dW_k`` / ``db_k`` blocks; task-specific gradients stay local (the trainer averages ``.grad``).
        """
        assert self._per_task is not None and self._layers is not None
        blocks = dict(self._per_task)
        for layer in self._layers:
            dw, db = layer.per_task()
            blocks[id(layer.module.weight)] = dw
            if db is not None:
                blocks[id(layer.module.bias)] = db
        self._layers = []
        keys = list(blocks)
        flat = torch.cat([blocks[key].reshape(-1) for key in keys])
        dist.all_reduce(flat)
        flat /= dist.get_world_size()
        parts = flat.split([blocks[key].numel() for key in keys])
        self._per_task = {key: part.view_as(blocks[key]) for key, part in zip(keys, parts, strict=True)}

    def _param_grads(self) -> list[torch.Tensor]:
        """Per-task gradient of every shared parameter, in ``shared`` order: ``(K, numel)`` each."""
        self._pass()
        assert self._per_task is not None and self._layers is not None
        k = self.n_tasks
        by_id = {pid: g.reshape(k, -1) for pid, g in self._per_task.items()}
        for layer in self._layers:
            dw, db = layer.per_task()
            by_id[id(layer.module.weight)] = dw.reshape(k, -1)
            if db is not None:
                by_id[id(layer.module.bias)] = db
        return [by_id[id(p)] for p in self.shared]

    def per_task_gradients(self) -> list[torch.Tensor]:
        """Per-task gradients of each shared parameter, in ``shared`` order: ``(K, numel)`` each.

        The blocks of :meth:`jacobian` without concatenating them (for element-wise methods)."""
        if self._jacobian is not None:
            return list(self._jacobian.split([p.numel() for p in self.shared], dim=1))
        return self._param_grads()

    def jacobian(self) -> torch.Tensor:
        """Per-task gradients of the shared parameters, flattened: ``(K, P)``.

        A task whose loss does not reach the shared parameters (e.g. no labels in the batch) has a
        zero row.
        """
        if self._jacobian is None:
            self._jacobian = torch.cat(self._param_grads(), dim=1)
        return self._jacobian

    def gramian(self) -> torch.Tensor:
        """``J J^T`` of the shared-parameter Jacobian ``(K, K)``, without forming J where possible."""
        if self._gramian is None:
            if self._jacobian is not None:
                self._gramian = self._jacobian @ self._jacobian.T
            else:
                self._pass()
                assert self._per_task is not None and self._layers is not None
                k = self.n_tasks
                losses = self._stacked_losses()
                g = torch.zeros(k, k, dtype=losses.dtype, device=losses.device)
                for layer in self._layers:
                    g = g + layer.gramian()
                for pg in self._per_task.values():
                    flat = pg.reshape(k, -1)
                    g = g + flat @ flat.T
                self._gramian = g
        return self._gramian

    def gradient_statistics(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(cosine (K, K), norms (K,))`` of the shared-parameter task gradients, if this step already
        formed the Gramian or the Jacobian (``None`` otherwise: no extra backward work is done)."""
        if self._gramian is None and self._jacobian is None:
            return None
        return gradient_cosine(self.gramian())

    def representation_jacobian(self) -> torch.Tensor:
        """Per-task gradients of the shared representation (all tensors, flattened): ``(K, R)``.

        Costs K backward passes through the task heads only, unless the full pass already ran.
        """
        if not self.representation:
            raise NoSharedParametersError("this model exposes no shared representation")
        if self._rep_grads is None:
            self._rep_grads = _batched_grads(self._loss_list(), self.representation, vmap=False)
        k = self.n_tasks
        return torch.cat([g.reshape(k, -1) for g in self._rep_grads], dim=1)

    # -------------------------------------------------------------- applying an update
    def _own_task_gradients(self, own_weights: Weights | None = None) -> None:
        """Give every task-specific parameter its own task's gradient (times ``own_weights[k]``)."""
        if not self.specific:
            return
        device = self._stacked_losses().device
        w = None if own_weights is None else torch.tensor([float(v) for v in self._vector(own_weights)], device=device)
        if self._specific_grads is not None:
            for p, g in zip(self.specific, self._specific_grads, strict=True):
                # Rows of other tasks are zero, so the (weighted) row sum is the own-task gradient.
                _accumulate(p, g.sum(0) if w is None else torch.tensordot(w.to(g.dtype), g, dims=1))
            return
        total = self._stacked_losses() if w is None else self._stacked_losses() * w
        total = total.sum()
        if total.requires_grad:
            torch.autograd.backward(total, inputs=self.specific, retain_graph=True)

    def apply_shared_weights(self, weights: Weights, own_weights: Weights | None = None) -> None:
        """Shared parameters get ``sum_k w_k g_k`` (``J^T w``); task-specific ones their own gradient
        (scaled by ``own_weights`` when given)."""
        self._pass()
        assert self._per_task is not None and self._layers is not None
        losses = self._stacked_losses()
        w = torch.tensor([float(v) for v in self._vector(weights)], dtype=losses.dtype, device=losses.device)
        for layer in self._layers:
            dw, db = layer.combined(w)
            _accumulate(layer.module.weight, dw)
            if db is not None:
                _accumulate(layer.module.bias, db)
        for p in self.shared:
            if id(p) in self._per_task:
                g = self._per_task[id(p)]
                _accumulate(p, torch.tensordot(w.to(g.dtype), g, dims=1))
        self._own_task_gradients(own_weights)

    def apply_shared_direction(
        self, direction: torch.Tensor | Sequence[torch.Tensor], own_weights: Weights | None = None
    ) -> None:
        """Set the shared parameters' gradients to ``direction`` (flattened, length P, or one tensor
        per shared parameter) and give each task-specific parameter its own task's gradient (scaled
        by ``own_weights`` when given)."""
        self._require_shared()
        sizes = [p.numel() for p in self.shared]
        if isinstance(direction, torch.Tensor):
            if sum(sizes) != direction.numel():
                raise ValueError(f"direction has {direction.numel()} entries, shared parameters have {sum(sizes)}")
            direction = direction.split(sizes)
        elif [d.numel() for d in direction] != sizes:
            raise ValueError(f"direction blocks have sizes {[d.numel() for d in direction]}, shared parameters {sizes}")
        for p, d in zip(self.shared, direction, strict=True):
            _accumulate(p, d)
        if self._specific_grads is None and self.captures:
            self._pass()
        self._own_task_gradients(own_weights)


def _accumulate(p: nn.Parameter, g: torch.Tensor) -> None:
    g = g.detach().to(p.dtype).reshape(p.shape)
    if p.grad is None:
        # A fresh result owns its storage; only views of shared buffers need a copy.
        p.grad = g if g._base is None else g.clone()
    else:
        p.grad += g
