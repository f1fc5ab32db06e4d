"""Exact k-th largest values without a full sort, for one tensor or streamed over a whole model.

Top-k masks (TIES, DARE-TIES, Breadcrumbs, PCB) need the exact k-th largest magnitude. A full sort
or ``torch.kthvalue`` of a multi-megabyte tensor costs far more than the merge itself, so we:

1. draw a random sample (32k values, fixed seed) and take a bracket ``[lo, hi]`` around the
   sample quantile, six binomial standard deviations wide on each side;
2. count the values above ``hi`` and gather the few inside the bracket (under 3% at a top-20% cut),
   block by block, with numpy's vectorised comparisons and compaction; when the k-th largest lies
   in the bracket (almost always), ``kthvalue`` of the gathered values gives it;
3. otherwise fall back to an exact two-level radix select on order-preserving float32 keys (floats
   order like their bit patterns once the magnitude bits of negative numbers are flipped).

The answer is exact in every case; the sample only decides how fast it comes. Over a whole model
(``kth_largest_stream``) step 1 reads only the sampled positions and step 2 is one streaming pass,
so the model is never materialised.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import numpy as np
import torch

__all__ = ["ValuesFn", "kth_largest", "kth_largest_stream", "top_count"]

SAMPLE = 1 << 15
_Z = 6.0  # bracket half-width in binomial standard deviations

# values_fn(where) -> the values of every model at ``where``: a tensor of flat positions, a slice
# (one block), or None (all positions). Values are computed on demand, so a block's temporaries stay small.
ValuesFn = Callable[[torch.Tensor | slice | None], list[torch.Tensor]]

_BLOCK = 1 << 16  # refine block by block: masks and temporaries stay in L2, about twice as fast


def top_count(n: int, share: float) -> int:
    """How many entries a share keeps: ``round(share * n)``, at least 1 when ``share > 0``."""
    return 0 if share <= 0 else min(n, max(1, round(share * n)))


def _bracket(sample: torch.Tensor, k: int, n: int) -> tuple[float, float]:
    m = sample.numel()
    q = 1.0 - k / n  # share of values below the k-th largest
    pos = q * m
    half = _Z * math.sqrt(m * q * (1 - q)) + 4
    i_lo, i_hi = math.floor(pos - half), math.ceil(pos + half)
    at = sorted({min(max(i_lo, 0), m - 1), min(max(i_hi, 0), m - 1)})
    # the two order statistics only: a partition is several times faster than sorting the sample
    part = np.partition(sample.detach().cpu().numpy(), at)
    lo = float(part[min(i_lo, m - 1)]) if i_lo > 0 else -math.inf
    hi = float(part[max(i_hi, 0)]) if i_hi < m else math.inf
    return lo, hi


def _refine(x: torch.Tensor, lo: float, hi: float, scratch: dict | None = None) -> tuple[int, torch.Tensor]:
    """How many entries of one block exceed ``hi``, and a superset of its entries with ``lo <= x <= hi``.

    The superset (a few values just outside the bracket) is trimmed once, on everything gathered
    (:func:`_trim`), instead of block by block. ``scratch`` keeps the temporaries from one call to the next.
    """
    if math.isinf(lo) or math.isinf(hi):
        above = int(torch.count_nonzero(x > hi)) if hi < math.inf else 0
        return above, x[(x >= lo) & (x <= hi)]
    # |x - c| <= h' is one comparison pass instead of two and a logical and; h' is widened beyond any
    # rounding of x - c (and of c), so it selects a superset of [lo, hi].
    c = (lo + hi) / 2
    h = (hi - lo) / 2 + (abs(lo) + abs(hi)) * 2.0**-16
    if x.is_contiguous() and x.dtype in _NUMPY_DTYPES and not x.requires_grad:
        # numpy's comparisons and compaction are vectorised; torch's on CPU are several times slower.
        # Scalars of the array's dtype: a Python float would make numpy compute in float64 (6x slower).
        # hi is a sampled value (exact in the dtype); rounding c and h moves the superset by far less
        # than h's widening.
        v = x.numpy()
        t = v.dtype.type
        hi, c, h = t(hi), t(c), t(h)
        key = (v.dtype, v.size)
        bufs = scratch.get(key) if scratch is not None else None
        if bufs is None:
            bufs = (np.empty_like(v), np.empty(v.size, dtype=bool))
            if scratch is not None:
                scratch[key] = bufs
        dist, mask = bufs
        above = int(np.count_nonzero(np.greater(v, hi, out=mask)))
        np.abs(np.subtract(v, c, out=dist), out=dist)
        return above, torch.from_numpy(np.compress(np.less_equal(dist, h, out=mask), v))
    return int(torch.count_nonzero(x > hi)), x[(x - c).abs_() <= h]


_NUMPY_DTYPES = (torch.float32, torch.float64)


class _Gathered:
    """Values gathered block by block, copied into one growing buffer.

    Keeping every block's few values as its own small array interleaves long-lived small allocations
    with the block-sized temporaries, which fragments the heap: resident memory grew by about one
    block per block (+400 MB over a 33.6M-parameter model, N = 4).
    """

    def __init__(self) -> None:
        self._buf: np.ndarray | None = None
        self._n = 0
        self._other: list[torch.Tensor] = []

    def add(self, t: torch.Tensor) -> None:
        if t.dtype not in _NUMPY_DTYPES:
            self._other.append(t)
            return
        a = t.numpy()
        if self._buf is None or self._buf.dtype != a.dtype:
            if self._buf is not None:
                self._other.append(torch.from_numpy(self._buf[: self._n].copy()))
            self._buf, self._n = np.empty(max(1 << 12, 2 * a.size), dtype=a.dtype), 0
        if self._n + a.size > self._buf.size:
            grown = np.empty(max(2 * self._buf.size, self._n + a.size), dtype=a.dtype)
            grown[: self._n] = self._buf[: self._n]
            self._buf = grown
        self._buf[self._n : self._n + a.size] = a
        self._n += a.size

    def tensor(self) -> torch.Tensor:
        parts = ([torch.from_numpy(self._buf[: self._n])] if self._buf is not None else []) + self._other
        return torch.cat(parts) if len(parts) > 1 else parts[0] if parts else torch.empty(0)


def _trim(wide: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    if wide.dtype in _NUMPY_DTYPES and not math.isinf(lo) and not math.isinf(hi):
        v = wide.numpy()
        t = v.dtype.type  # lo and hi are sampled values: exact in the dtype
        return torch.from_numpy(np.compress((v >= t(lo)) & (v <= t(hi)), v))
    return wide[(wide >= lo) & (wide <= hi)]


def _sample(stream: Callable[[], Iterable[tuple[int, ValuesFn]]], numel: int, m: int, size: int) -> list[torch.Tensor]:
    """About ``size`` values per model, drawn uniformly over all positions of the stream (fixed seed)."""
    g = torch.Generator().manual_seed(numel)
    parts: list[list[torch.Tensor]] = [[] for _ in range(m)]
    for n_t, fn in stream():
        expect = size * n_t / numel
        cnt = min(n_t, math.floor(expect) + int(torch.rand((), generator=g) < expect % 1))
        if cnt:
            for i, v in enumerate(fn(torch.randint(n_t, (cnt,), generator=g))):
                parts[i].append(v)
    return [torch.cat(p) if p else torch.empty(0) for p in parts]


def kth_largest(x: torch.Tensor, k: int, *, sample: int = SAMPLE) -> torch.Tensor:
    """The exact k-th largest entry of a 1-D tensor (``1 <= k <= numel``), as a 0-d tensor."""
    n = x.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k={k} is out of range [1, {n}]")
    if n <= 4 * sample:
        return torch.kthvalue(x, n - k + 1).values
    return torch.tensor(kth_largest_stream(lambda: [(n, lambda w: [x if w is None else x[w]])], n, [k])[0])


def kth_largest_stream(
    stream: Callable[[], Iterable[tuple[int, ValuesFn]]], numel: int, ks: Sequence[int], *, sample: int = SAMPLE
) -> list[float]:
    """Exact k-th largest (``ks[i]`` for model i) of values streamed tensor by tensor.

    ``stream()`` starts a pass and yields ``(n_t, values_fn)`` per tensor (see :data:`ValuesFn`).
    Usually two passes (sampled positions, then one full pass block by block); two more, of a radix
    select, only for the rare models whose bracket missed.
    """
    m = len(ks)
    for k in ks:
        if not 1 <= k <= numel:
            raise ValueError(f"k={k} is out of range [1, {numel}]")
    brackets = [
        _bracket(p, k, numel) if p.numel() else (-math.inf, math.inf)
        for p, k in zip(_sample(stream, numel, m, sample), ks, strict=True)
    ]
    above = [0] * m
    mids = [_Gathered() for _ in range(m)]
    scratch: dict = {}
    for n_t, fn in stream():
        for start in range(0, n_t, _BLOCK):
            for i, v in enumerate(fn(slice(start, start + _BLOCK))):
                n_above, mid = _refine(v, *brackets[i], scratch)
                above[i] += n_above
                if above[i] < ks[i]:  # once k values lie above hi, the bracket has missed; stop gathering
                    mids[i].add(mid)
    out: list[float | None] = [None] * m
    failed = []
    for i in range(m):
        mid = _trim(mids[i].tensor(), *brackets[i])
        r = ks[i] - above[i]
        if 1 <= r <= mid.numel():
            j = mid.numel() - r  # 0-based position of the r-th largest in ascending order
            out[i] = (
                float(np.partition(mid.numpy(), j)[j])
                if mid.dtype in _NUMPY_DTYPES
                else float(torch.kthvalue(mid, j + 1).values)
            )
        else:
            failed.append(i)
    mids.clear()
    if failed:
        for i, v in zip(failed, _radix_stream(stream, [ks[i] for i in failed], failed), strict=True):
            out[i] = v
    return [float(v) for v in out]  # type: ignore[arg-type]


def _ordered(v: torch.Tensor) -> torch.Tensor:
    """int32 keys that sort like the float32 values (negative floats have their magnitude bits flipped)."""
    b = (v.to(torch.float32) + 0.0).view(torch.int32)  # + 0.0 turns -0.0 into +0.0
    return torch.where(b < 0, b ^ 0x7FFFFFFF, b)


def _from_ordered(key: int) -> float:
    b = key ^ 0x7FFFFFFF if key < 0 else key
    return float(torch.tensor([b], dtype=torch.int32).view(torch.float32))


def _radix_stream(
    stream: Callable[[], Iterable[tuple[int, ValuesFn]]], ks: Sequence[int], models: Sequence[int]
) -> list[float]:
    """Two-level radix select on order-preserving float32 keys (16 high bits, then 16 low bits): two passes."""

    def find(hist: torch.Tensor, k: int) -> tuple[int, int]:
        above = hist.flip(0).cumsum(0).flip(0) - hist  # count strictly above each bin
        b = int(torch.nonzero((above < k) & (above + hist >= k))[0])
        return b, k - int(above[b])

    hi = [torch.zeros(1 << 16, dtype=torch.int64) for _ in models]
    for _, fn in stream():
        vals = fn(None)
        for j, i in enumerate(models):
            hi[j] += torch.bincount((_ordered(vals[i]) >> 16) + (1 << 15), minlength=1 << 16)
    found = [find(h, k) for h, k in zip(hi, ks, strict=True)]
    lo = [torch.zeros(1 << 16, dtype=torch.int64) for _ in models]
    for _, fn in stream():
        vals = fn(None)
        for j, i in enumerate(models):
            key = _ordered(vals[i])
            lo[j] += torch.bincount(key[(key >> 16) + (1 << 15) == found[j][0]] & 0xFFFF, minlength=1 << 16)
    out = []
    for j in range(len(models)):
        low, _ = find(lo[j], found[j][1])
        high = found[j][0] - (1 << 15)
        out.append(_from_ordered((high << 16) | low))
    return out
