"""Twin-Merging: a shared merged model plus compressed exclusive knowledge, mixed per input by a router.

Lu, Fan, Zhou, Ma, Fu, Wu and Chen, "Twin-Merging: Dynamic Integration of Modular Expertise in Model
Merging", NeurIPS 2024. Three parts:

1. *Shared knowledge*: ``theta_s = base + lam * sum_k tau_k`` (task arithmetic).
2. *Exclusive knowledge* of task ``k``: ``delta_k = theta_k - theta_s``, compressed per matrix by a
   truncated SVD of rank ``rank`` (``U_r S_r`` and ``V_r^T`` are kept); vectors (biases, norms) are
   kept whole. At full rank the compression is exact.
3. A *router*: a two-layer MLP on the shared model's output for an input (for text encoders: the
   mean-pooled sentence vector), trained with cross-entropy to tell the tasks' inputs apart.
   For an input batch, ``w = mean over the batch of softmax(router(features))`` and the model run on
   it is ``theta_s + sum_k w_k delta_k`` (routing per batch; batch size 1 routes each input).

Representation: the method returns one flat state dict: the shared model under the base's keys,
plus ``twin.exclusive.<k>.<key>.u`` / ``.v`` (factors) or ``.full`` (vectors) for every task ``k``
and ``twin.router.<i>.weight`` / ``.bias`` for the router. :class:`TwinMerged` reads it back:
``TwinMerged(merged).predict(data, k, x)`` routes ``x`` and runs task ``k``'s head, and
``TwinMerged(merged).parameters_for(w)`` gives the weights for a routing vector ``w``; loading only
the base's keys gives the shared model.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from polytask.merge._coeffs import TaskVectors
from polytask.merge._data import Inputs, MergeData, check_models
from polytask.merge._registry import register_merge

__all__ = ["TwinMerged", "twin_merging"]

_PREFIX = "twin."


def _router(in_dim: int, hidden: int, n_tasks: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, n_tasks))


def _compress(delta: torch.Tensor, rank: int) -> dict[str, torch.Tensor]:
    if delta.dim() != 2:
        return {"full": delta.clone()}
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = min(rank, s.shape[0])
    return {"u": (u[:, :r] * s[:r]).float(), "v": vh[:r].float()}


class TwinMerged:
    """A Twin-Merging result read back from its flat state dict (see the module doc)."""

    def __init__(self, merged: Mapping[str, torch.Tensor]) -> None:
        self.shared = {k: v for k, v in merged.items() if not k.startswith(_PREFIX)}
        self.exclusive: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
        router: dict[str, torch.Tensor] = {}
        for k, v in merged.items():
            if k.startswith(_PREFIX + "exclusive."):
                rest = k[len(_PREFIX + "exclusive.") :]
                task, _, key_part = rest.partition(".")
                key, _, part = key_part.rpartition(".")
                self.exclusive.setdefault(int(task), {}).setdefault(key, {})[part] = v
            elif k.startswith(_PREFIX + "router."):
                router[k[len(_PREFIX + "router.") :]] = v
        if not self.exclusive or not router:
            raise ValueError("not a Twin-Merging state dict: no 'twin.exclusive.*' or 'twin.router.*' tensors")
        self.n_tasks = len(self.exclusive)
        w0, w2 = router["0.weight"], router["2.weight"]
        self.router = _router(w0.shape[1], w0.shape[0], w2.shape[0])
        self.router.load_state_dict(router)
        self.router.eval()

    def delta(self, k: int, key: str) -> torch.Tensor:
        parts = self.exclusive[k][key]
        return parts["full"] if "full" in parts else parts["u"] @ parts["v"]

    def parameters_for(self, weights: torch.Tensor) -> dict[str, torch.Tensor]:
        """``theta_s + sum_k w_k delta_k`` for a routing vector ``weights`` (length = tasks)."""
        w = torch.as_tensor(weights, dtype=torch.float32).reshape(-1)
        if w.numel() != self.n_tasks:
            raise ValueError(f"routing weights must have {self.n_tasks} entries, got {w.numel()}")
        out = dict(self.shared)
        for key in self.exclusive[0]:
            b = self.shared[key]
            mix = sum(w[k] * self.delta(k, key) for k in range(self.n_tasks) if float(w[k]) != 0.0)
            out[key] = (b.float() + mix).to(b.dtype) if torch.is_tensor(mix) else b
        return out

    @torch.no_grad()
    def route(self, data: MergeData, x: Inputs) -> torch.Tensor:
        """Routing vector of a batch: the batch mean of the router's softmax."""
        z = data.features(data.module, self.shared, x).float()
        return torch.softmax(self.router(z), dim=-1).mean(0)

    @torch.no_grad()
    def predict(self, data: MergeData, k: int, x: Inputs) -> torch.Tensor:
        """Task ``k``'s prediction on batch ``x`` with the weights routed for ``x``."""
        return data.predict(self.parameters_for(self.route(data, x)), k, x)


@register_merge(
    "twin-merging",
    "Lu et al., Twin-Merging: Dynamic Integration of Modular Expertise in Model Merging, NeurIPS 2024",
    "shared task-arithmetic model + truncated-SVD exclusive knowledge per task, mixed per input batch by a router",
    data_driven=True,
    lam=0.3,
    rank=16,
    router_hidden=64,
    router_steps=200,
    router_lr=1e-2,
    seed=0,
)
def twin_merging(
    base: dict[str, torch.Tensor],
    models: list[dict[str, torch.Tensor]],
    *,
    data: MergeData | None = None,
    lam: float = 0.3,
    rank: int = 16,
    router_hidden: int = 64,
    router_steps: int = 200,
    router_lr: float = 1e-2,
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Flat state dict: shared model + ``twin.*`` factors and router (read it with :class:`TwinMerged`)."""
    data = check_models(base, models, data, "twin-merging")
    if rank < 1 or router_hidden < 1 or router_steps < 0:
        raise ValueError(
            f"merge method 'twin-merging': rank and router_hidden must be >= 1 and router_steps >= 0, "
            f"got rank={rank}, router_hidden={router_hidden}, router_steps={router_steps}"
        )
    tv = TaskVectors(base, models)
    coef = torch.full((len(models), 1), float(lam))
    shared = tv.finish(tv.combine(coef, tv.block_index("task")))
    out = dict(shared)
    for k, m in enumerate(models):
        for key in tv.keys:
            delta = m[key].float() - shared[key].float()
            for part, v in _compress(delta, rank).items():
                out[f"{_PREFIX}exclusive.{k}.{key}.{part}"] = v

    # The router learns which task an input comes from, on the shared model's features.
    with torch.no_grad():
        feats, labels = [], []
        for k in range(len(models)):
            for x, _ in data.tasks[k].batches:
                z = data.features(data.module, shared, x).float()
                feats.append(z.reshape(z.shape[0], -1))
                labels.append(torch.full((z.shape[0],), k, dtype=torch.long))
        z_all, y_all = torch.cat(feats), torch.cat(labels)
        mu, sd = z_all.mean(0), z_all.std(0).clamp(min=1e-6)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    router = _router(z_all.shape[1], router_hidden, len(models))
    opt = torch.optim.Adam(router.parameters(), lr=router_lr)
    zs = (z_all - mu) / sd
    for _ in range(router_steps):
        idx = torch.randint(zs.shape[0], (min(256, zs.shape[0]),), generator=gen)
        loss = nn.functional.cross_entropy(router(zs[idx]), y_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    with torch.no_grad():  # fold the feature standardisation into the first layer
        w0 = router[0].weight / sd  # router(z) on raw features == trained router on standardised ones
        b0 = router[0].bias - w0 @ mu
        router[0].weight.copy_(w0)
        router[0].bias.copy_(b0)
    for name, v in router.state_dict().items():
        out[f"{_PREFIX}router.{name}"] = v.detach().clone()
    return out
