"""Mod-Squad and M³ViT: vision transformers whose mixture-of-experts layers are routed per task.

Chen, Shen, Ding, Chen, Zhao, Learned-Miller & Gan, "Mod-Squad: Designing Mixtures of Experts As Modular
Multi-Task Learners", CVPR 2023 (code: UMass-Foundation-Model/Mod-Squad); its heterogeneous-data follow-up
Chen et al., "An Efficient General-Purpose Modular Vision Model via Multi-Task Heterogeneous Training",
arXiv 2306.17165. Liang et al., "M³ViT: Mixture-of-Experts Vision Transformer for Efficient Multi-task
Learning with Model-Accelerator Co-design", NeurIPS 2022 (code: VITA-Group/M3ViT).

Both replace transformer sub-layers by mixtures of experts shared by all tasks and give every task its
own router (a linear map of the token) that picks ``top_k`` experts per token. Every task therefore runs
its own pass through the trunk, and at inference a task needs only the experts its router selects.

- Mod-Squad: mixture-of-attention-heads (MoA: experts are heads with their own query and output
  projections, keys and values shared) and MoE MLPs in every block, a learned task embedding added
  to the tokens before every block, and a loss maximising the mutual information between tasks and
  experts, ``MI(T; E) = H(E) - H(E|T)``, from the batch-averaged router probabilities (weighted per MoE
  layer and summed over layers, as in the authors' code; weight 0.005 in their ``..._MI_twice``
  configurations, 0.0005 in the heterogeneous follow-up). A task can be extracted as a standalone
  model holding only the experts it uses (:meth:`ModSquad.extract`).
- M³ViT: dense attention; MoE MLPs in every other block (the odd ones); per-task routers (the paper's
  multi-gate design; its task-conditioned shared router is not implemented here); a load-balancing
  loss ``cv²(importance) + cv²(load)`` (Shazeer et al., 2017) instead of the MI loss.

Choices of this implementation (all options of :class:`ModSquad`):

- top-k weights are renormalised over the selected experts (``normalize=True``: the softmax of the
  selected logits); both official codes use the unrenormalised softmax probabilities
  (``normalize=False``). Either way the routing of a token depends only on its router's logits.
- no router noise (the M³ViT README runs with noise 0; Mod-Squad's MI configurations disable it).
- inputs: images are cut into ``patch_size`` patches; tables become one token per column (the feature
  tokenizer of FT-Transformer, Gorishniy et al., NeurIPS 2021), so the model also runs on tables.
- the representation handed to balancers is the last tensor shared by all tasks, ``(N, L, dim)``: the
  embedded tokens, or the output of the dense blocks before the first MoE block (M³ViT: block 0).
  After it every task has its own pass, so per-task trunk outputs would share nothing.
- the model only sees inputs, not which task a row is labelled for, so every task routes every row
  and the losses mask the unlabelled ones; ``P(T)`` in the MI loss is therefore uniform. The papers'
  heterogeneous training runs each sample through its own task's pass only.

Dispatch is sparse: each expert runs only on the tokens routed to it (one gather sorted by expert, one
loop over experts, one scatter-add). MoA experts project only their tokens' queries and outputs; the
attention itself is one call over all (token, selected head) pairs, the cost of ``top_k`` heads.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from polytask.data._tensors import InputSpec
from polytask.nn._base import MultiTaskModel, register_model
from polytask.nn.encoders import Hidden, resolve_hidden
from polytask.nn.heads import TaskHead
from polytask.tasks import Task

__all__ = [
    "M3ViT",
    "ModSquad",
    "cv_balance_loss",
    "mutual_information",
    "router_z_loss",
    "switch_balance_loss",
    "task_expert_joint",
]

_TINY = 1e-12
_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu}


# ----------------------------------------------------------------------------- losses
def task_expert_joint(probs: torch.Tensor) -> torch.Tensor:
    """Joint ``P(T, E)`` from router probabilities ``(T, M, E)`` of T tasks on M tokens each.

    Every task routes the same number of tokens, so ``P(T) = 1/T`` and ``P(E | T)`` is the task's
    batch-averaged router distribution.
    """
    return probs.mean(dim=1) / probs.shape[0]


def mutual_information(joint: torch.Tensor) -> torch.Tensor:
    """``MI(T; E) = sum P(t,e) log(P(t,e) / (P(t) P(e))) = H(E) - H(E|T)`` in nats of a joint table
    ``(T, E)`` that sums to one; Mod-Squad minimises ``-MI``."""
    pt = joint.sum(dim=1, keepdim=True)
    pe = joint.sum(dim=0, keepdim=True)
    log_ratio = torch.log(joint.clamp_min(_TINY)) - torch.log((pt * pe).clamp_min(_TINY))
    return (joint * log_ratio).sum()


def switch_balance_loss(probs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Switch Transformer load balancing ``E * sum_e f_e P_e`` (Fedus et al., JMLR 2022) of one
    router: ``probs (M, E)``, selected experts ``idx (M, k)``; ``f_e`` is the share of the M*k
    assignments that went to expert e (the form of Mod-Squad's ``switchloss``)."""
    e = probs.shape[1]
    f = torch.bincount(idx.reshape(-1), minlength=e).to(probs.dtype) / idx.numel()
    return e * (f * probs.mean(dim=0)).sum()


def _cv_squared(x: torch.Tensor) -> torch.Tensor:
    if x.numel() < 2:
        return x.new_zeros(())
    x = x.float()
    return x.var() / (x.mean() ** 2 + 1e-10)


def cv_balance_loss(gates: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``cv²(importance) + cv²(load)`` (Shazeer et al., ICLR 2017; M³ViT's V-MoE gate) of one router:
    ``gates (M, E)`` the routed weights (zero off the selected experts), ``idx (M, k)``. Without router
    noise the load (tokens per expert) is a count, so only the importance term has a gradient."""
    load = torch.bincount(idx.reshape(-1), minlength=gates.shape[1])
    return _cv_squared(gates.sum(dim=0)) + _cv_squared(load)


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """Router z-loss ``mean(logsumexp(logits)^2)`` (Zoph et al., ST-MoE, 2022)."""
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


# ----------------------------------------------------------------------------- routing
class _Routing(NamedTuple):
    idx: torch.Tensor  # (S, M, k) selected router rows
    weight: torch.Tensor  # (S, M, k) their mixing weights
    probs: torch.Tensor  # (S, M, E) router softmax
    logits: torch.Tensor  # (S, M, E)


class _Plan(NamedTuple):
    order: torch.Tensor  # assignment ids (token * top_k + j) sorted by expert slot
    rows: torch.Tensor  # the token of each sorted assignment
    counts: list[int]  # assignments per expert slot


class _MoE(nn.Module):
    """Per-task routers over ``n_experts`` router rows, of which ``kept`` have expert weights.

    A full model keeps every expert. An extracted one keeps a subset but all router rows, so that its
    router logits (and, with ``normalize=False``, the softmax normaliser) are exactly the full model's;
    selection is restricted to kept rows. Routing statistics of eval-mode passes are kept in buffers
    outside the state dict.
    """

    slot: torch.Tensor
    selectable: torch.Tensor
    usage_sum: torch.Tensor
    prob_sum: torch.Tensor
    entropy_sum: torch.Tensor
    selected: torch.Tensor
    count: torch.Tensor

    def __init__(
        self, dim: int, n_tasks: int, n_experts: int, top_k: int, kept: Sequence[int], normalize: bool
    ) -> None:
        super().__init__()
        self.n_experts, self.top_k, self.normalize = n_experts, top_k, normalize
        self.kept = [int(k) for k in kept]
        self.record = True  # off while routing() / used_experts() inspect the model
        self.routers = nn.ModuleList(nn.Linear(dim, n_experts, bias=False) for _ in range(n_tasks))
        slot = torch.full((n_experts,), -1, dtype=torch.long)
        slot[self.kept] = torch.arange(len(self.kept))
        self.register_buffer("slot", slot, persistent=False)
        self.register_buffer("selectable", slot >= 0, persistent=False)
        for name, shape, dtype in (
            ("usage_sum", (n_tasks, n_experts), torch.float64),
            ("prob_sum", (n_tasks, n_experts), torch.float64),
            ("entropy_sum", (n_tasks,), torch.float64),
            ("selected", (n_tasks, n_experts), torch.long),
            ("count", (n_tasks,), torch.long),
        ):
            self.register_buffer(name, torch.zeros(shape, dtype=dtype), persistent=False)

    @property
    def n_slots(self) -> int:
        return len(self.kept)

    def route(self, x: torch.Tensor, task_ids: Sequence[int]) -> _Routing:
        """Route ``x (S, M, dim)``: stream s with the router of task ``task_ids[s]``."""
        logits = torch.stack([self.routers[t](x[s]) for s, t in enumerate(task_ids)])
        probs = torch.softmax(logits, dim=-1)
        masked = logits if bool(self.selectable.all()) else logits.masked_fill(~self.selectable, float("-inf"))
        top, idx = masked.topk(self.top_k, dim=-1)
        # Renormalised top-k weights are the softmax of the selected logits: independent of the
        # other experts' logits, hence unchanged when experts are removed.
        weight = torch.softmax(top, dim=-1) if self.normalize else probs.gather(-1, idx)
        routing = _Routing(idx, weight, probs, logits)
        if self.record and not self.training:
            self._record(routing, task_ids)
        return routing

    @torch.no_grad()
    def _record(self, r: _Routing, task_ids: Sequence[int]) -> None:
        for s, t in enumerate(task_ids):
            gates = torch.zeros_like(r.probs[s]).scatter_(-1, r.idx[s], r.weight[s])
            self.usage_sum[t] += gates.sum(0).double()
            self.prob_sum[t] += r.probs[s].sum(0).double()
            self.entropy_sum[t] += torch.special.entr(r.probs[s]).sum().double()
            self.selected[t] += torch.bincount(r.idx[s].reshape(-1), minlength=self.n_experts)
            self.count[t] += r.probs.shape[1]

    def reset_statistics(self) -> None:
        for buf in (self.usage_sum, self.prob_sum, self.entropy_sum, self.selected, self.count):
            buf.zero_()

    def aux_terms(self, r: _Routing, balance: str) -> dict[str, torch.Tensor]:
        """Training losses of this layer: ``-MI(T; E)``, load balancing (mean over tasks), z-loss."""
        if balance == "switch":
            bal = torch.stack([switch_balance_loss(r.probs[s], r.idx[s]) for s in range(r.idx.shape[0])])
        else:
            gates = torch.zeros_like(r.probs).scatter(-1, r.idx, r.weight)
            bal = torch.stack([cv_balance_loss(gates[s], r.idx[s]) for s in range(r.idx.shape[0])])
        return {
            "mi": -mutual_information(task_expert_joint(r.probs)),
            "balance": bal.mean(),
            "z": router_z_loss(r.logits),
        }

    def plan(self, r: _Routing) -> _Plan:
        """Sort the token-expert assignments by expert (stable, so each expert sees its tokens in order)."""
        k = r.idx.shape[-1]
        slots = self.slot[r.idx.reshape(-1)]
        order = torch.argsort(slots, stable=True)
        rows = torch.div(order, k, rounding_mode="floor")
        return _Plan(order, rows, torch.bincount(slots, minlength=self.n_slots).tolist())

    @staticmethod
    def per_expert(p: _Plan, xs: torch.Tensor, fn: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``fn(slot, rows of xs)`` for each expert's block of the sorted assignments ``xs``."""
        return torch.cat([fn(e, chunk) for e, chunk in enumerate(xs.split(p.counts)) if chunk.shape[0]])

    @staticmethod
    def combine(p: _Plan, r: _Routing, y: torch.Tensor, n_rows: int) -> torch.Tensor:
        """Weighted sum of the sorted expert outputs ``y`` back onto ``n_rows`` tokens."""
        y = y * r.weight.reshape(-1)[p.order].unsqueeze(1)
        return y.new_zeros(n_rows, y.shape[1]).index_add(0, p.rows, y)

    def report(self, names: Sequence[str]) -> dict[str, Any]:
        out: dict[str, Any] = {"expert_usage": {}, "gate_entropy": {}, "expert_selected": {}}
        for t, name in enumerate(names):
            n = int(self.count[t])
            if n == 0:
                continue
            usage = self.usage_sum[t]
            out["expert_usage"][name] = (usage / usage.sum()).tolist()
            out["gate_entropy"][name] = float(self.entropy_sum[t]) / n
            sel = self.selected[t].double()
            out["expert_selected"][name] = (sel / sel.sum()).tolist()
        rows = [t for t in range(len(names)) if int(self.count[t])]
        if len(rows) > 1:
            cond = torch.stack([self.prob_sum[t] / int(self.count[t]) for t in rows])
            out["mutual_information"] = float(mutual_information(cond / len(rows)))
        return out


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, training: bool) -> torch.Tensor:
    """``softmax(q k^T / sqrt(d)) v``. Training uses the explicit form: CPU flash attention has no
    double backward, which regularisers of gradients (Rep-MTL) need."""
    if not training:
        return F.scaled_dot_product_attention(q, k, v)
    return torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1]), dim=-1) @ v


def _init_expert(*shape: int) -> nn.Parameter:
    return nn.Parameter(nn.init.trunc_normal_(torch.empty(*shape), std=0.02))


class _MoEMLP(_MoE):
    """Experts ``Linear(dim, hidden) -> activation -> Linear(hidden, dim)``, stacked per kept expert."""

    inactive_sum: torch.Tensor
    inactive_count: torch.Tensor

    def __init__(
        self,
        dim: int,
        hidden: int,
        n_tasks: int,
        n_experts: int,
        top_k: int,
        kept: Sequence[int],
        normalize: bool,
        activation: str,
    ) -> None:
        super().__init__(dim, n_tasks, n_experts, top_k, kept, normalize)
        s = self.n_slots
        self.w1, self.w2 = _init_expert(s, dim, hidden), _init_expert(s, hidden, dim)
        self.b1, self.b2 = nn.Parameter(torch.zeros(s, hidden)), nn.Parameter(torch.zeros(s, dim))
        self.act = _ACTIVATIONS[activation]
        self.register_buffer("inactive_sum", torch.zeros(s, dtype=torch.long), persistent=False)
        self.register_buffer("inactive_count", torch.zeros(s, dtype=torch.long), persistent=False)

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        h = torch.addmm(self.b1[e], x, self.w1[e])
        if self.record and not self.training:
            # hidden units at or below zero: exact zeros of a ReLU (dead units), GELU's nearly-off half
            self.inactive_sum[e] += int((h <= 0).sum())
            self.inactive_count[e] += h.numel()
        return torch.addmm(self.b2[e], self.act(h), self.w2[e])

    def forward(self, x: torch.Tensor, task_ids: Sequence[int], aux: list[_Routing]) -> torch.Tensor:
        s, n, length, d = x.shape
        r = self.route(x.reshape(s, n * length, d), task_ids)
        aux.append(r)
        flat = x.reshape(-1, d)
        p = self.plan(r)
        y = self.per_expert(p, flat[p.rows], self._expert)
        return self.combine(p, r, y, flat.shape[0]).view(s, n, length, d)

    def reset_statistics(self) -> None:
        super().reset_statistics()
        self.inactive_sum.zero_()
        self.inactive_count.zero_()

    def inactive_share(self) -> list[float] | None:
        """Per router row: share of hidden units at or below zero (NaN for removed or unused experts)."""
        if int(self.inactive_count.sum()) == 0:
            return None
        per_slot = (self.inactive_sum.double() / self.inactive_count.clamp(min=1)).tolist()
        used = self.inactive_count.tolist()
        out = [math.nan] * self.n_experts
        for slot, row in enumerate(self.kept):
            out[row] = per_slot[slot] if used[slot] else math.nan
        return out


class _MoEAttention(_MoE):
    """Mixture of attention heads (Zhang et al., EMNLP 2022; Mod-Squad's MoA): expert e is one head
    with its own query and output projections; keys and values come from one shared projection."""

    def __init__(
        self,
        dim: int,
        head_dim: int,
        n_tasks: int,
        n_experts: int,
        top_k: int,
        kept: Sequence[int],
        normalize: bool,
    ) -> None:
        super().__init__(dim, n_tasks, n_experts, top_k, kept, normalize)
        s = self.n_slots
        self.head_dim = head_dim
        self.kv = nn.Linear(dim, 2 * head_dim)
        self.wq, self.wo = _init_expert(s, dim, head_dim), _init_expert(s, head_dim, dim)
        self.bq, self.bo = nn.Parameter(torch.zeros(s, head_dim)), nn.Parameter(torch.zeros(s, dim))

    def forward(self, x: torch.Tensor, task_ids: Sequence[int], aux: list[_Routing]) -> torch.Tensor:
        s, n, length, d = x.shape
        r = self.route(x.reshape(s, n * length, d), task_ids)
        aux.append(r)
        key, value = self.kv(x.reshape(s * n, length, d)).unsqueeze(1).chunk(2, dim=-1)
        flat = x.reshape(-1, d)
        p = self.plan(r)
        q = self.per_expert(p, flat[p.rows], lambda e, xs: torch.addmm(self.bq[e], xs, self.wq[e]))
        # Back in token order every sample holds exactly length * top_k queries (one per selected
        # head), so one attention call over all samples costs top_k dense heads.
        q = torch.empty_like(q).index_copy(0, p.order, q)
        o = _attend(q.view(s * n, 1, length * self.top_k, self.head_dim), key, value, self.training)
        o = o.reshape(-1, self.head_dim)[p.order]
        y = self.per_expert(p, o, lambda e, os: torch.addmm(self.bo[e], os, self.wo[e]))
        return self.combine(p, r, y, flat.shape[0]).view(s, n, length, d)


class _Attention(nn.Module):
    """Dense multi-head self-attention."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, task_ids: Sequence[int], aux: list[_Routing]) -> torch.Tensor:
        s, n, length, d = x.shape
        qkv = self.qkv(x.reshape(s * n, length, d)).view(s * n, length, 3, self.heads, d // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        o = _attend(q, k, v, self.training).transpose(1, 2).reshape(s, n, length, d)
        return self.proj(o)


class _MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.act = _ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor, task_ids: Sequence[int], aux: list[_Routing]) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    """Pre-norm transformer block on ``(streams, N, L, dim)``."""

    def __init__(self, dim: int, attn: nn.Module, mlp: nn.Module) -> None:
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), attn
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), mlp

    def forward(self, x: torch.Tensor, task_ids: Sequence[int], aux: list[_Routing]) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), task_ids, aux)
        return x + self.mlp(self.norm2(x), task_ids, aux)


class _Tokens(nn.Module):
    """Input -> tokens ``(N, L, dim)`` with position embeddings (and a CLS token first if asked)."""

    def __init__(self, spec: InputSpec, dim: int, patch_size: int, cls: bool) -> None:
        super().__init__()
        self.kind = spec.kind
        if spec.kind == "text":
            raise ValueError(
                "the MoE ViTs (mod-squad, m3vit) read images or tables, not text; use model 'text' or a "
                "shared architecture (shared-bottom, mmoe, ...) on text"
            )
        if spec.kind == "image":
            if spec.height % patch_size or spec.width % patch_size:
                raise ValueError(f"patch_size {patch_size} must divide the image size {spec.height}x{spec.width}")
            self.patch = nn.Conv2d(spec.channels, dim, kernel_size=patch_size, stride=patch_size)
            n_tokens = (spec.height // patch_size) * (spec.width // patch_size)
        else:
            # FT-Transformer feature tokenizer: numeric value * w_j + b_j, one embedding table per column
            bound = 1 / math.sqrt(dim)
            self.n_numeric = spec.n_numeric
            self.num_w = nn.Parameter(torch.empty(spec.n_numeric, dim).uniform_(-bound, bound))
            self.num_b = nn.Parameter(torch.empty(spec.n_numeric, dim).uniform_(-bound, bound))
            self.cat = nn.ModuleList(nn.Embedding(c, dim) for c in spec.cardinalities)
            for emb in self.cat:
                nn.init.uniform_(emb.weight, -bound, bound)
            n_tokens = spec.n_numeric + len(spec.cardinalities)
            if n_tokens == 0:
                raise ValueError("a tabular input needs at least one numeric or categorical column")
        self.cls = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, 1, dim), std=0.02)) if cls else None
        self.n_tokens = n_tokens + int(cls)
        self.pos = nn.Parameter(nn.init.trunc_normal_(torch.empty(1, self.n_tokens, dim), std=0.02))

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.kind == "image":
            tokens = self.patch(x["image"]).flatten(2).transpose(1, 2)
        else:
            parts = [x["num"].unsqueeze(-1) * self.num_w + self.num_b] if self.n_numeric else []
            parts += [emb(x["cat"][:, j]).unsqueeze(1) for j, emb in enumerate(self.cat)]
            tokens = torch.cat(parts, dim=1)
        if self.cls is not None:
            tokens = torch.cat([self.cls.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        return tokens + self.pos


_PAPER = (
    "Chen et al., 'Mod-Squad: Designing Mixtures of Experts As Modular Multi-Task Learners', CVPR 2023; "
    "heterogeneous training: Chen et al., arXiv 2306.17165, 2023"
)
_M3VIT_PAPER = (
    "Liang et al., 'M³ViT: Mixture-of-Experts Vision Transformer for Efficient Multi-task Learning with "
    "Model-Accelerator Co-design', NeurIPS 2022"
)
_COMMON: dict[str, Any] = {
    "dim": 64,
    "depth": 4,
    "heads": 4,
    "patch_size": 4,
    "mlp_ratio": 4.0,
    "n_experts": 8,
    "top_k": 2,
    "expert_hidden": "auto",
    "attn_experts": 8,
    "normalize": True,
    "activation": "gelu",
    "pool": "mean",
    "tower_hidden": (),
    "balance": "switch",
    "z_weight": 0.0,
    "kept_experts": None,
}


@register_model(
    "mod-squad",
    paper=_PAPER,
    description="ViT with task-routed MoE attention and MLP experts, task/expert mutual-information loss; "
    "extract(task) gives a single-task model with only that task's experts",
    **_COMMON,
    moe_every=1,
    moe_attention=True,
    task_embedding=True,
    mi_weight=0.005,
    balance_weight=0.0,
)
class ModSquad(MultiTaskModel):
    """Task-routed mixture-of-experts ViT (Mod-Squad; with other settings M³ViT, see :class:`M3ViT`).

    Shared: token embedding, LayerNorms, experts (and dense attention/MLP sub-layers). Task-specific:
    each MoE layer's router of the task, its task embedding, its head. Each forward runs one pass per
    task through the trunk, one after another; :meth:`forward_task` runs one. The representation is
    the output of the dense blocks before the first MoE block (the embedded tokens when there are none
    or task embeddings enter every block), ``(N, L, dim)``: the last tensor all tasks share.

    Args:
        dim, depth, heads: width, blocks and attention heads (``dim`` divisible by ``heads``).
        patch_size: side of the square image patches (must divide the image size).
        mlp_ratio: hidden width of dense MLPs as a multiple of ``dim``.
        n_experts, top_k: MLP experts per MoE layer and how many each token uses.
        expert_hidden: hidden width of an MLP expert; ``"auto"``: ``mlp_ratio * dim / top_k`` (the
            selected experts together as wide as a dense MLP, as in Mod-Squad).
        moe_every: MoE MLP in blocks ``moe_every-1, 2*moe_every-1, ...`` (1: every block; M³ViT: 2).
        moe_attention: mixture of attention heads in those blocks: ``attn_experts`` heads of width
            ``dim / heads``, ``heads`` of them per token; dense attention otherwise.
        normalize: renormalise the top-k weights (else the raw softmax probabilities of the selected).
        activation: ``"gelu"`` or ``"relu"`` in MLPs and experts.
        pool: ``"mean"`` over the tokens or the ``"cls"`` token, after a final LayerNorm.
        task_embedding: add a learned per-task vector to the tokens before every block (Mod-Squad).
        tower_hidden: hidden widths of each task's head.
        mi_weight: weight of ``-MI(T; E)`` per MoE layer (summed over layers).
        balance, balance_weight: ``"switch"`` (``E sum f_e P_e``) or ``"cv"`` (``cv²`` of importance
            and load) load balancing per router, mean over tasks, summed over layers.
        z_weight: weight of the router z-loss, summed over layers.
        kept_experts: per MoE layer (block order, attention before MLP), the experts that have
            weights; ``None`` keeps all. Set by :meth:`extract`.
    """

    def __init__(
        self,
        tasks: list[Task],
        input_spec: InputSpec,
        dim: int = 64,
        depth: int = 4,
        heads: int = 4,
        patch_size: int = 4,
        mlp_ratio: float = 4.0,
        n_experts: int = 8,
        top_k: int = 2,
        expert_hidden: int | Literal["auto"] = "auto",
        moe_every: int = 1,
        moe_attention: bool = True,
        attn_experts: int = 8,
        normalize: bool = True,
        activation: str = "gelu",
        pool: str = "mean",
        task_embedding: bool = True,
        tower_hidden: Hidden = (),
        mi_weight: float = 0.005,
        balance: str = "switch",
        balance_weight: float = 0.0,
        z_weight: float = 0.0,
        kept_experts: Sequence[Sequence[int]] | None = None,
    ) -> None:
        super().__init__(tasks, input_spec)
        for name, v in (("dim", dim), ("depth", depth), ("heads", heads), ("patch_size", patch_size)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        if dim % heads:
            raise ValueError(f"dim {dim} must be divisible by heads {heads}")
        if n_experts < 1 or not 1 <= top_k <= n_experts:
            raise ValueError(f"top_k must be in [1, n_experts]; got top_k={top_k}, n_experts={n_experts}")
        if moe_attention and attn_experts < heads:
            raise ValueError(f"attn_experts ({attn_experts}) must be >= heads ({heads}), the heads each token uses")
        if moe_every < 1 or moe_every > depth:
            raise ValueError(f"moe_every must be in [1, depth={depth}], got {moe_every}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation '{activation}'; valid: {', '.join(_ACTIVATIONS)}")
        if pool not in ("mean", "cls"):
            raise ValueError(f"pool must be 'mean' or 'cls', got '{pool}'")
        if balance not in ("switch", "cv"):
            raise ValueError(f"balance must be 'switch' or 'cv', got '{balance}'")
        if min(mi_weight, balance_weight, z_weight) < 0:
            raise ValueError(f"loss weights must be >= 0, got {mi_weight=}, {balance_weight=}, {z_weight=}")
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio}")
        if expert_hidden == "auto":
            hidden = max(1, int(mlp_ratio * dim) // top_k)
        elif isinstance(expert_hidden, int) and not isinstance(expert_hidden, bool) and expert_hidden >= 1:
            hidden = expert_hidden
        else:
            raise ValueError(f"expert_hidden must be 'auto' or a positive int, got {expert_hidden!r}")
        self.config: dict[str, Any] = {
            "dim": dim, "depth": depth, "heads": heads, "patch_size": patch_size, "mlp_ratio": mlp_ratio,
            "n_experts": n_experts, "top_k": top_k, "expert_hidden": expert_hidden, "moe_every": moe_every,
            "moe_attention": moe_attention, "attn_experts": attn_experts, "normalize": normalize,
            "activation": activation, "pool": pool, "task_embedding": task_embedding,
            "tower_hidden": tower_hidden, "mi_weight": mi_weight, "balance": balance,
            "balance_weight": balance_weight, "z_weight": z_weight, "kept_experts": kept_experts,
        }  # fmt: skip
        self.mi_weight, self.balance, self.balance_weight, self.z_weight = mi_weight, balance, balance_weight, z_weight
        self.pool = pool
        n_tasks = len(tasks)
        moe_blocks = [b for b in range(depth) if b % moe_every == moe_every - 1]
        per_block = ([(attn_experts, heads)] if moe_attention else []) + [(n_experts, top_k)]
        layer_sizes = [size for _ in moe_blocks for size in per_block]
        kept = _check_kept(kept_experts, layer_sizes)
        self.tokens = _Tokens(input_spec, dim, patch_size, cls=pool == "cls")
        self.task_embeddings = (
            nn.ParameterList(nn.Parameter(torch.zeros(1, 1, dim)) for _ in tasks) if task_embedding else None
        )
        blocks, j = [], 0
        for b in range(depth):
            attn: nn.Module
            mlp: nn.Module
            if b in moe_blocks and moe_attention:
                attn = _MoEAttention(dim, dim // heads, n_tasks, attn_experts, heads, kept[j], normalize)
                j += 1
            else:
                attn = _Attention(dim, heads)
            if b in moe_blocks:
                mlp = _MoEMLP(dim, hidden, n_tasks, n_experts, top_k, kept[j], normalize, activation)
                j += 1
            else:
                mlp = _MLP(dim, int(mlp_ratio * dim), activation)
            blocks.append(_Block(dim, attn, mlp))
        self.blocks = nn.ModuleList(blocks)
        # Dense blocks before the first MoE block compute the same for every task (unless a task
        # embedding enters them): run them once.
        self.n_shared_blocks = 0 if task_embedding else moe_blocks[0]
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        tower = resolve_hidden(tower_hidden, input_spec, tabular=(), image=())
        self.heads = nn.ModuleList(TaskHead(dim, t, tower) for t in tasks)
        self._init_dense()
        self._aux: torch.Tensor | None = None

    def _init_dense(self) -> None:
        # ViT initialisation: truncated normal (std 0.02) linear weights, zero biases
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    # ------------------------------------------------------------------ forward
    def moe_layers(self) -> list[tuple[str, _MoE]]:
        """``(name, layer)`` of every MoE layer in block order (the order of ``kept_experts``)."""
        return [(n, m) for n, m in self.named_modules() if isinstance(m, _MoE)]

    def _run(
        self, x: dict[str, torch.Tensor], task_ids: Sequence[int]
    ) -> tuple[dict[str, torch.Tensor], torch.Tensor, list[_Routing]]:
        shared = self.tokens(x)
        for block in self.blocks[: self.n_shared_blocks]:
            shared = block(shared.unsqueeze(0), [], [])[0]
        preds: dict[str, torch.Tensor] = {}
        per_task: list[list[_Routing]] = []
        # One pass per task, one after another: stacking the passes into one batch is slower on CPU
        # (the activations of all tasks together no longer fit the caches).
        for t in task_ids:
            h = shared.unsqueeze(0)
            routings: list[_Routing] = []
            for block in self.blocks[self.n_shared_blocks :]:
                if self.task_embeddings is not None:
                    h = h + self.task_embeddings[t]
                h = block(h, [t], routings)
            pooled = self.norm(h[0].mean(dim=1)) if self.pool == "mean" else self.norm(h[0, :, 0])
            preds[self.task_names[t]] = self.heads[t](pooled)
            per_task.append(routings)
        # per layer, the tasks' routings stacked along the stream axis
        merged = [
            _Routing(*(torch.cat(parts) for parts in zip(*layer, strict=True))) for layer in zip(*per_task, strict=True)
        ]
        self._aux = self._auxiliary(merged) if self.training else None
        return preds, shared, merged

    def _auxiliary(self, routings: list[_Routing]) -> torch.Tensor | None:
        weights = {"mi": self.mi_weight, "balance": self.balance_weight, "z": self.z_weight}
        if not routings or not any(weights.values()):
            return None
        layers = [m for _, m in self.moe_layers()]
        total = routings[0].probs.new_zeros(())
        for layer, r in zip(layers, routings, strict=True):
            terms = layer.aux_terms(r, self.balance)
            total = total + sum(w * terms[k] for k, w in weights.items() if w)
        return total

    def forward_with_representation(
        self, x: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        preds, shared, _ = self._run(x, list(range(len(self.tasks))))
        return preds, [shared]

    def forward_task(self, x: dict[str, torch.Tensor], task: str) -> torch.Tensor:
        """Only ``task``'s prediction: one pass through the trunk instead of one per task."""
        return self._run(x, [self._task_index(task)])[0][task]

    def auxiliary_loss(self) -> torch.Tensor | None:
        """``mi_weight * sum(-MI) + balance_weight * sum(balance) + z_weight * sum(z)`` over the MoE
        layers of the last training-mode forward pass (None in eval mode or when all weights are 0)."""
        return self._aux

    def routing(self, x: dict[str, torch.Tensor]) -> dict[str, list[dict[str, torch.Tensor]]]:
        """Per task, per MoE layer (block order): ``weights (N*L, n_experts)`` (zero off the selected
        experts), router ``probs`` and selected ``idx (N*L, top_k)`` of one pass in the current
        mode, without gradients and without recording diagnostics."""
        aux = self._aux  # the trainer's auxiliary loss must stay the last training step's
        with torch.no_grad(), self._not_recording():
            routings = self._run(x, list(range(len(self.tasks))))[2]
        self._aux = aux
        out: dict[str, list[dict[str, torch.Tensor]]] = {t: [] for t in self.task_names}
        for r in routings:
            gates = torch.zeros_like(r.probs).scatter(-1, r.idx, r.weight)
            for s, t in enumerate(self.task_names):
                out[t].append({"weights": gates[s], "probs": r.probs[s], "idx": r.idx[s]})
        return out

    @contextmanager
    def _not_recording(self) -> Iterator[None]:
        layers = [m for _, m in self.moe_layers()]
        for m in layers:
            m.record = False
        try:
            yield
        finally:
            for m in layers:
                m.record = True

    def task_parameter_names(self, task: str) -> list[str]:
        i = self._task_index(task)
        names = self._parameter_names_under(f"heads.{i}", *(f"{n}.routers.{i}" for n, _ in self.moe_layers()))
        if self.task_embeddings is not None:
            names.append(f"task_embeddings.{i}")
        return names

    # ------------------------------------------------------------------ diagnostics
    def diagnostics(self) -> dict[str, Any]:
        """Over eval-mode passes since :meth:`reset_diagnostics`: ``expert_usage`` (share of routed
        weight per expert, sums to one) and ``gate_entropy`` (mean router entropy, nats) per task at
        the last MoE MLP layer; ``expert_zero_share`` per MoE MLP layer (share of expert hidden units
        at or below zero: dead ReLU units; NaN for removed or unused experts); ``layers`` with the
        same per MoE layer plus ``expert_selected`` (share of token slots per expert) and
        ``mutual_information`` (MI(T; E) of the recorded router probabilities, nats)."""
        layers = []
        zero: dict[str, list[float]] = {}
        for name, m in self.moe_layers():
            rep = m.report(self.task_names)
            layers.append({"layer": name, "experts": list(m.kept), **rep})
            if isinstance(m, _MoEMLP) and (share := m.inactive_share()) is not None:
                zero[name] = share
        last = next((lay for lay in reversed(layers) if lay["layer"].endswith(".mlp")), None)
        out: dict[str, Any] = {
            "expert_usage": dict(last["expert_usage"]) if last else {},
            "gate_entropy": dict(last["gate_entropy"]) if last else {},
        }
        if zero:
            out["expert_zero_share"] = zero
        out["layers"] = layers
        return out

    def reset_diagnostics(self) -> None:
        for _, m in self.moe_layers():
            m.reset_statistics()

    # ------------------------------------------------------------------ task-sparse inference
    @torch.no_grad()
    def used_experts(
        self, task: str, data: dict[str, torch.Tensor] | None = None, batch_size: int = 1024
    ) -> list[list[int]]:
        """Per MoE layer, how many token slots of ``task`` each expert took: on ``data`` (eval mode,
        one pass of that task only), or over the eval-mode passes recorded since
        :meth:`reset_diagnostics`."""
        i = self._task_index(task)
        layers = [m for _, m in self.moe_layers()]
        if data is None:
            if not layers or int(layers[0].count[i]) == 0:
                raise ValueError(f"no routing recorded for task '{task}'; pass data= or run eval-mode forward passes")
            return [m.selected[i].tolist() for m in layers]
        counts = [torch.zeros(m.n_experts, dtype=torch.long) for m in layers]
        was, aux = self.training, self._aux
        self.eval()
        try:
            with self._not_recording():
                n = next(iter(data.values())).shape[0]
                for start in range(0, n, batch_size):
                    routings = self._run({k: v[start : start + batch_size] for k, v in data.items()}, [i])[2]
                    for c, m, r in zip(counts, layers, routings, strict=True):
                        c += torch.bincount(r.idx.reshape(-1), minlength=m.n_experts).cpu()
        finally:
            self.train(was)
            self._aux = aux
        return [c.tolist() for c in counts]

    def extract(self, task: str, data: dict[str, torch.Tensor] | None = None, threshold: float = 0.0) -> ModSquad:
        """A single-task model of the same class holding only the experts ``task`` uses.

        Used experts come from :meth:`used_experts` (on ``data``, or the recorded eval passes). An
        expert is kept when its share of the task's token slots in a layer exceeds ``threshold``;
        at least ``top_k`` per layer are kept (the most used). With ``threshold=0`` every expert
        selected on ``data`` is kept and the routers are copied whole, so on ``data`` the extracted
        model's predictions equal the full model's ``task`` predictions (up to float rounding of
        differently shaped matrix products). On other inputs a token whose top-k would include a
        removed expert uses the best kept ones instead (Mod-Squad's usage-threshold pruning).
        The result is rebuilt by ``build_model(name, [task], input_spec, **extracted.config)``.
        """
        if not 0.0 <= threshold < 1.0:
            raise ValueError(f"threshold must be in [0, 1), got {threshold}")
        i = self._task_index(task)
        counts = self.used_experts(task, data)
        kept_new: list[list[int]] = []
        for (_, m), c in zip(self.moe_layers(), counts, strict=True):
            total = max(sum(c), 1)
            keep = {e for e in m.kept if c[e] / total > threshold}
            # routing needs top_k selectable experts: add the most used remaining ones
            for e in sorted(m.kept, key=lambda e: (-c[e], e)):
                if len(keep) >= m.top_k:
                    break
                keep.add(e)
            kept_new.append(sorted(keep))
        config = {**self.config, "kept_experts": kept_new}
        single = type(self)([self.tasks[i]], self.input_spec, **config)
        src = self.state_dict()
        layer_of = {name: (m, kept) for (name, m), kept in zip(self.moe_layers(), kept_new, strict=True)}
        state = {}
        for key in single.state_dict():
            state[key] = _source_tensor(key, i, src, layer_of)
        single.load_state_dict(state)
        return single.train(self.training)


def _source_tensor(
    key: str, task: int, src: dict[str, torch.Tensor], layer_of: dict[str, tuple[_MoE, list[int]]]
) -> torch.Tensor:
    """The full model's tensor for ``key`` of the extracted one: task index 0 -> ``task``, expert
    slots -> the slots of the kept experts."""
    prefix = key.rpartition(".")[0]
    if prefix in layer_of:
        m, kept = layer_of[prefix]
        slots = [int(m.slot[e]) for e in kept]
        return src[key][slots].clone()
    for part in ("heads.0.", "task_embeddings.0", ".routers.0."):
        if part in key:
            return src[key.replace(part, part.replace("0", str(task)))].clone()
    return src[key].clone()


def _check_kept(kept: Sequence[Sequence[int]] | None, sizes: list[tuple[int, int]]) -> list[list[int]]:
    if kept is None:
        return [list(range(n)) for n, _ in sizes]
    kept = [sorted({int(e) for e in layer}) for layer in kept]
    if len(kept) != len(sizes):
        raise ValueError(f"kept_experts needs one list per MoE layer ({len(sizes)}), got {len(kept)}")
    for j, (layer, (n, k)) in enumerate(zip(kept, sizes, strict=True)):
        if len(layer) < k or layer[0] < 0 or layer[-1] >= n:
            raise ValueError(f"kept_experts[{j}] must hold >= {k} expert ids in [0, {n}), got {layer}")
    return kept


@register_model(
    "m3vit",
    paper=_M3VIT_PAPER,
    description="ViT with MoE MLPs in every other block, one router per task (multi-gate), "
    "cv² load balancing; extract(task) gives a single-task model",
    **{**_COMMON, "balance": "cv"},
    moe_every=2,
    moe_attention=False,
    task_embedding=False,
    mi_weight=0.0,
    balance_weight=0.01,
)
class M3ViT(ModSquad):
    """M³ViT (multi-gate design): :class:`ModSquad` with MoE MLPs in the odd blocks only, dense
    attention, no task embedding, no MI loss and ``cv²`` load balancing (weight 0.01, as V-MoE; the
    weight M³ViT used is not stated in its README). See :class:`ModSquad` for the arguments."""

    def __init__(self, tasks: list[Task], input_spec: InputSpec, **kwargs: Any) -> None:
        defaults = {
            "moe_every": 2, "moe_attention": False, "task_embedding": False,
            "mi_weight": 0.0, "balance": "cv", "balance_weight": 0.01,
        }  # fmt: skip
        super().__init__(tasks, input_spec, **{**defaults, **kwargs})
