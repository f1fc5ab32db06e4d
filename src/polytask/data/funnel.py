"""``funnel-synthetic``: impressions of a simulated shop, with the click -> conversion funnel.

Each row is one impression of an item to a user. The labels follow the funnel of ESMM (Ma et al.,
SIGIR 2018) and AITM (Xi et al., KDD 2021), where each step can only happen after the previous one:

* ``click``: the impression was clicked;
* ``conversion``: clicked *and* converted (ESMM's CTCVR label), so ``conversion = 1`` implies
  ``click = 1``; the post-click conversion rate (CVR) is ``P(conversion | click)``;
* ``purchase`` (only with ``n_steps=3``): converted *and* paid, so it implies ``conversion``.

The latent model (:func:`funnel_frame`) is fixed: the coefficients below do not depend on ``seed``,
which only draws the rows. Every step has a logistic model of its own on the same features, with
effects that differ on purpose between steps: the display ``position`` moves clicks only, the
``price`` mostly conversions, ``desktop`` users click less but convert more, and a user-segment x
item-category affinity (fixed table) helps every step. The true step probabilities are returned by
:func:`funnel_frame` (``p_click``, ``p_cvr``, ``p_purchase``), so that a model's estimate of the
post-click CVR can be scored on *all* impressions, which real logs cannot do.

Rates: CTR ~18%; CVR ~30% among clicked impressions but ~22% averaged over all impressions (the
sample selection bias that ESMM addresses); CTCVR ~5.4%; purchase ~3.6% of impressions.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from polytask.data._bundle import DataBundle, register_dataset
from polytask.data._table import TableEncoder, split_indices

__all__ = ["FUNNEL_CATEGORICAL", "FUNNEL_NUMERIC", "funnel_frame", "funnel_synthetic"]

FUNNEL_NUMERIC: tuple[str, ...] = ("price", "rating", "position", "user_activity")
FUNNEL_CATEGORICAL: tuple[str, ...] = ("user_segment", "item_category", "device", "daypart")
_STEPS: tuple[str, ...] = ("click", "conversion", "purchase")
_LATENT: tuple[str, ...] = ("p_click", "p_cvr", "p_purchase")

_SEGMENTS = ("new", "casual", "loyal", "vip")
_SEGMENT_SHARE = (0.3, 0.4, 0.2, 0.1)
_CATEGORIES = tuple(f"cat{i}" for i in range(8))
_DEVICES = ("mobile", "desktop", "tablet")
_DEVICE_SHARE = (0.6, 0.3, 0.1)
_DAYPARTS = ("night", "morning", "afternoon", "evening")

# Effects per step: click, conversion given click, purchase given conversion.
_SEGMENT_EFFECT = {"click": (-0.3, 0.0, 0.2, 0.4), "cvr": (-0.6, -0.1, 0.4, 0.8), "purchase": (-0.4, 0.0, 0.3, 0.6)}
_DEVICE_EFFECT = {"click": (0.2, -0.3, 0.0), "cvr": (-0.3, 0.5, 0.1), "purchase": (0.0, 0.3, 0.0)}
_DAYPART_EFFECT = {"click": (-0.4, 0.0, 0.1, 0.3), "cvr": (0.2, 0.0, 0.0, -0.1)}
# The segment x category affinity is drawn once from a fixed generator: part of the model, not of the sample.
_AFFINITY = np.random.default_rng(20180708).normal(0.0, 0.6, size=(len(_SEGMENTS), len(_CATEGORIES)))

_SOURCE = "synthetic (polytask.data.funnel): a fixed latent logistic model per funnel step"


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def funnel_frame(n_rows: int = 20000, seed: int = 0, n_steps: int = 2) -> pd.DataFrame:
    """``n_rows`` simulated impressions: the inputs, the 0/1 step labels and the true probabilities.

    Columns: the inputs :data:`FUNNEL_NUMERIC` and :data:`FUNNEL_CATEGORICAL` (categories as text),
    the labels ``click``, ``conversion`` (and ``purchase`` when ``n_steps == 3``), and the latent
    probabilities ``p_click`` (CTR), ``p_cvr`` (conversion given click) and, with three steps,
    ``p_purchase`` (purchase given conversion). Deterministic in ``(n_rows, seed, n_steps)``.
    """
    if n_steps not in (2, 3):
        raise ValueError(f"n_steps must be 2 (click, conversion) or 3 (+ purchase), got {n_steps}")
    if n_rows < 1:
        raise ValueError(f"n_rows must be positive, got {n_rows}")
    rng = np.random.default_rng([seed, 7])
    seg = rng.choice(len(_SEGMENTS), size=n_rows, p=_SEGMENT_SHARE)
    cat = rng.integers(0, len(_CATEGORIES), size=n_rows)
    dev = rng.choice(len(_DEVICES), size=n_rows, p=_DEVICE_SHARE)
    day = rng.integers(0, len(_DAYPARTS), size=n_rows)
    log_price = rng.normal(3.0, 0.7, size=n_rows) + 0.15 * cat / (len(_CATEGORIES) - 1)
    price = np.round(np.exp(log_price), 2)
    rating = np.round(np.clip(rng.normal(3.8, 0.7, size=n_rows), 1.0, 5.0), 1)
    position = rng.integers(1, 11, size=n_rows).astype(np.float64)
    activity = rng.gamma(2.0, 1.0, size=n_rows) * (1.0 + 0.3 * seg)

    price_z = (np.log(price) - 3.07) / 0.7
    rating_z = (rating - 3.8) / 0.7
    activity_z = (activity - 3.0) / 2.5
    affinity = _AFFINITY[seg, cat]

    def effect(table: dict[str, tuple[float, ...]], step: str, idx: np.ndarray) -> np.ndarray:
        return np.asarray(table[step])[idx] if step in table else np.zeros(len(idx))

    click_logit = (
        -0.5
        - 0.25 * (position - 1.0)
        + 0.35 * rating_z
        + 0.4 * activity_z
        - 0.2 * price_z
        + affinity
        + effect(_SEGMENT_EFFECT, "click", seg)
        + effect(_DEVICE_EFFECT, "click", dev)
        + effect(_DAYPART_EFFECT, "click", day)
    )
    cvr_logit = (
        -1.4
        - 0.9 * price_z
        + 0.6 * rating_z
        + 0.1 * activity_z
        + 0.8 * affinity
        + effect(_SEGMENT_EFFECT, "cvr", seg)
        + effect(_DEVICE_EFFECT, "cvr", dev)
        + effect(_DAYPART_EFFECT, "cvr", day)
    )
    p_click, p_cvr = _sigmoid(click_logit), _sigmoid(cvr_logit)
    # One uniform per step and row, drawn whatever the rates, so labels of earlier steps do not
    # depend on n_steps.
    u = rng.random(size=(n_rows, 3))
    click = u[:, 0] < p_click
    conversion = click & (u[:, 1] < p_cvr)
    frame = {
        "price": price,
        "rating": rating,
        "position": position,
        "user_activity": np.round(activity, 3),
        "user_segment": np.asarray(_SEGMENTS, dtype=object)[seg],
        "item_category": np.asarray(_CATEGORIES, dtype=object)[cat],
        "device": np.asarray(_DEVICES, dtype=object)[dev],
        "daypart": np.asarray(_DAYPARTS, dtype=object)[day],
        "click": click.astype(np.int64),
        "conversion": conversion.astype(np.int64),
        "p_click": p_click,
        "p_cvr": p_cvr,
    }
    if n_steps == 3:
        purchase_logit = 0.1 - 0.5 * price_z + 0.3 * affinity + effect(_SEGMENT_EFFECT, "purchase", seg)
        purchase_logit = purchase_logit + effect(_DEVICE_EFFECT, "purchase", dev)
        p_purchase = _sigmoid(purchase_logit)
        frame["purchase"] = (conversion & (u[:, 2] < p_purchase)).astype(np.int64)
        frame["p_purchase"] = p_purchase
    return pd.DataFrame(frame)


@register_dataset(
    "funnel-synthetic",
    "synthetic impressions with the funnel click -> conversion (-> purchase, n_steps=3); binary; 60/20/20",
    _SOURCE,
)
def funnel_synthetic(
    seed: int = 0,
    n_rows: int = 20000,
    val_fraction: float = 0.2,
    test_fraction: float = 0.2,
    n_steps: int = 2,
) -> DataBundle:
    """The :func:`funnel_frame` rows split at random into train/val/test (``seed``), encoded on train.

    Tasks in funnel order: ``click``, ``conversion`` (clicked and converted) and, with
    ``n_steps=3``, ``purchase``. The true probabilities are not model inputs; the bundle's
    ``meta["latent"]`` says where to get them.
    """
    if n_rows < 200:
        raise ValueError(f"n_rows must be at least 200 (rare funnel steps need positives in every split), got {n_rows}")
    df = funnel_frame(n_rows, seed, n_steps)
    tr, va, te = split_indices(len(df), val_fraction, test_fraction, seed)
    steps = list(_STEPS[:n_steps])
    latent = [c for c in _LATENT if c in df.columns]
    enc = TableEncoder(
        [f"{s}:binary" for s in steps],
        numeric=list(FUNNEL_NUMERIC),
        categorical=list(FUNNEL_CATEGORICAL),
        drop=latent,
        positive={s: "1" for s in steps},
    ).fit(df.iloc[tr])
    meta = {
        "source": _SOURCE,
        "funnel": steps,
        "latent": f"true step probabilities {latent}: rows of polytask.data.funnel.funnel_frame({n_rows}, {seed}, "
        f"{n_steps}) at polytask.data.split_indices({n_rows}, {val_fraction}, {test_fraction}, {seed})",
        "split": {
            "how": "random train/val/test of the simulated rows",
            "seed": seed,
            "rows": len(df),
            "train": len(tr),
            "val": len(va),
            "test": len(te),
        },
    }
    return DataBundle.encoded("funnel-synthetic", enc, df.iloc[tr], df.iloc[va], df.iloc[te], meta)
