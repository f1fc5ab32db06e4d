"""Fitted trees as plain arrays: JSON (de)serialisation and prediction without pickle.

scikit-learn keeps a fitted tree in a Cython ``Tree`` object (``DecisionTreeRegressor.tree_``) and
``HistGradientBoosting*`` keeps one ``TreePredictor`` per stage; neither is JSON-serialisable, and
pickling is not allowed for checkpoints. :class:`ArrayTree` holds the same node arrays (children,
split feature, threshold, leaf values, and for histogram trees the missing-value direction and the
categorical bitsets) and predicts by walking all rows down the tree one level at a time, following
the same comparison rules as scikit-learn, so a reloaded model predicts exactly what it did in memory.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["ArrayTree", "HGBRaw"]


class ArrayTree:
    """One regression tree as node arrays.

    Node ``i`` is a leaf when ``left[i] < 0``; otherwise a row goes left when its value of
    ``feature[i]`` is ``<= threshold[i]`` (NaN goes left iff ``missing_left[i]``), or, for categorical
    nodes of histogram trees, when its category's bit is set in ``bitsets[bitset_idx[i]]``.
    ``value`` is ``(n_nodes, n_outputs)``.
    """

    def __init__(
        self,
        left: np.ndarray,
        right: np.ndarray,
        feature: np.ndarray,
        threshold: np.ndarray,
        value: np.ndarray,
        missing_left: np.ndarray | None = None,
        is_categorical: np.ndarray | None = None,
        bitset_idx: np.ndarray | None = None,
        bitsets: np.ndarray | None = None,
        float32_inputs: bool = True,
    ) -> None:
        self.left = np.asarray(left, dtype=np.intp)
        self.right = np.asarray(right, dtype=np.intp)
        self.feature = np.asarray(feature, dtype=np.intp)
        self.threshold = np.asarray(threshold, dtype=np.float64)
        value = np.asarray(value, dtype=np.float64)
        self.value = value.reshape(len(self.left), -1)
        n = len(self.left)
        self.missing_left = np.zeros(n, bool) if missing_left is None else np.asarray(missing_left, bool)
        self.is_categorical = np.zeros(n, bool) if is_categorical is None else np.asarray(is_categorical, bool)
        self.bitset_idx = np.zeros(n, np.intp) if bitset_idx is None else np.asarray(bitset_idx, np.intp)
        self.bitsets = np.zeros((0, 8), np.uint32) if bitsets is None else np.asarray(bitsets, np.uint32).reshape(-1, 8)
        # scikit-learn's DecisionTree compares float32 inputs; HistGradientBoosting compares float64.
        self.float32_inputs = bool(float32_inputs)

    @classmethod
    def from_sklearn(cls, tree: Any) -> ArrayTree:
        """From a fitted ``DecisionTreeRegressor`` (its ``tree_`` arrays)."""
        t = tree.tree_
        missing = getattr(t, "missing_go_to_left", None)
        return cls(
            t.children_left.copy(),
            t.children_right.copy(),
            t.feature.copy(),
            t.threshold.copy(),
            t.value[:, :, 0].copy(),
            missing_left=None if missing is None else np.asarray(missing, dtype=bool).copy(),
        )

    @property
    def n_outputs(self) -> int:
        return self.value.shape[1]

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Leaf values ``(n_rows, n_outputs)`` of the rows of ``X``."""
        return self.value[self.apply(X)]

    def apply(self, X: np.ndarray) -> np.ndarray:
        """The leaf (node index) each row of ``X`` lands in."""
        X = np.asarray(X)
        X = X.astype(np.float32).astype(np.float64) if self.float32_inputs else X.astype(np.float64, copy=False)
        node = np.zeros(len(X), dtype=np.intp)
        rows = np.arange(len(X))
        while rows.size:
            cur = node[rows]
            internal = self.left[cur] >= 0
            rows, cur = rows[internal], cur[internal]
            if not rows.size:
                break
            x = X[rows, self.feature[cur]]
            nan = np.isnan(x)
            go_left = np.where(nan, self.missing_left[cur], x <= self.threshold[cur])
            cat = self.is_categorical[cur] & ~nan
            if cat.any():
                v = x[cat].astype(np.int64)
                words = self.bitsets[self.bitset_idx[cur[cat]], v // 32]
                go_left[cat] = ((words >> (v % 32).astype(np.uint32)) & 1).astype(bool)
            node[rows] = np.where(go_left, self.left[cur], self.right[cur])
        return node

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "left": self.left.tolist(),
            "right": self.right.tolist(),
            "feature": self.feature.tolist(),
            "threshold": self.threshold.tolist(),
            "value": self.value.tolist(),
            "float32_inputs": self.float32_inputs,
        }
        if self.missing_left.any():
            d["missing_left"] = self.missing_left.tolist()
        if self.is_categorical.any():
            d["is_categorical"] = self.is_categorical.tolist()
            d["bitset_idx"] = self.bitset_idx.tolist()
            d["bitsets"] = self.bitsets.tolist()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ArrayTree:
        return cls(
            np.asarray(d["left"]),
            np.asarray(d["right"]),
            np.asarray(d["feature"]),
            np.asarray(d["threshold"], dtype=np.float64),
            np.asarray(d["value"], dtype=np.float64),
            missing_left=np.asarray(d["missing_left"]) if "missing_left" in d else None,
            is_categorical=np.asarray(d["is_categorical"]) if "is_categorical" in d else None,
            bitset_idx=np.asarray(d["bitset_idx"]) if "bitset_idx" in d else None,
            bitsets=np.asarray(d["bitsets"], dtype=np.uint32) if "bitsets" in d else None,
            float32_inputs=bool(d.get("float32_inputs", True)),
        )


class HGBRaw:
    """The raw-score function of a fitted ``HistGradientBoosting*`` model: baseline + stage trees.

    Built from the private ``_predictors`` (node records whose leaf values already include the
    learning rate) and ``_baseline_prediction``; the round-trip tests pin this to the installed
    scikit-learn. Categorical columns must come first and be coded ``0..k-1`` with every code present
    in training, so that the model's internal ordinal encoding is the identity (the pooled baseline
    passes the task code that way).
    """

    def __init__(self, baseline: np.ndarray, stages: list[list[ArrayTree]]) -> None:
        self.baseline = np.asarray(baseline, dtype=np.float64).ravel()
        self.stages = stages

    @classmethod
    def from_model(cls, model: Any) -> HGBRaw:
        stages = []
        for stage in model._predictors:
            trees = []
            for pred in stage:
                nodes = pred.nodes
                leaf = nodes["is_leaf"].astype(bool)
                trees.append(
                    ArrayTree(
                        np.where(leaf, -1, nodes["left"].astype(np.int64)),
                        np.where(leaf, -1, nodes["right"].astype(np.int64)),
                        nodes["feature_idx"],
                        nodes["num_threshold"],
                        nodes["value"][:, None],
                        missing_left=nodes["missing_go_to_left"].astype(bool),
                        is_categorical=nodes["is_categorical"].astype(bool),
                        bitset_idx=nodes["bitset_idx"],
                        bitsets=np.asarray(pred.raw_left_cat_bitsets, dtype=np.uint32),
                        float32_inputs=False,
                    )
                )
            stages.append(trees)
        return cls(np.asarray(model._baseline_prediction), stages)

    def predict_raw(self, X: np.ndarray) -> np.ndarray:
        """Raw scores ``(n_rows, n_outputs)``: regression values, binary logits, multiclass logits."""
        out = np.tile(self.baseline, (len(X), 1))
        for stage in self.stages:
            for k, tree in enumerate(stage):
                out[:, k] += tree.predict(X)[:, 0]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline.tolist(), "stages": [[t.to_dict() for t in st] for st in self.stages]}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> HGBRaw:
        return cls(np.asarray(d["baseline"]), [[ArrayTree.from_dict(t) for t in st] for st in d["stages"]])
