"""Networks: encoders, heads and the multi-task architectures behind one registry.

>>> from polytask.nn import MODELS
>>> sorted(MODELS)[:5]
['aitm', 'apem', 'cgc', 'controllable', 'cross-stitch']
"""

from __future__ import annotations

from polytask.nn._base import MODELS, ModelEntry, MultiTaskModel, build_model, register_model
from polytask.nn.architectures import CGC, PLE, MMoE, SharedBottom, SingleTask
from polytask.nn.encoders import (
    MLP,
    ImageInput,
    LeNetTrunk,
    TabularEmbedding,
    auto_embedding_dim,
    gate_input,
    make_expert,
    make_stem,
)
from polytask.nn.heads import SoftmaxGate, TaskHead
from polytask.nn.text import TextEncoderModel, TextMultiTaskModel  # registers 'text'

__all__ = [
    "CGC",
    "MLP",
    "MODELS",
    "PLE",
    "ImageInput",
    "LeNetTrunk",
    "MMoE",
    "ModelEntry",
    "MultiTaskModel",
    "SharedBottom",
    "SingleTask",
    "SoftmaxGate",
    "TabularEmbedding",
    "TaskHead",
    "TextEncoderModel",
    "TextMultiTaskModel",
    "auto_embedding_dim",
    "build_model",
    "gate_input",
    "make_expert",
    "make_stem",
    "register_model",
]
