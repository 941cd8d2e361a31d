"""ferrolm's models, one module per architecture, each a ``torch.nn.Module`` with a config
dataclass: :mod:`.gpt` (GPT-2 layout, GPT-2 conversion), :mod:`.lstm` (LSTM/GRU language
model), :mod:`.classifier` (any backbone + pooling + head), :mod:`.seq2seq` (encoder-decoder
Transformer and LSTM), :mod:`.attention_lstm` (self-attention + BiLSTM), :mod:`.llama`
(Llama, SmolLM2, Qwen2: GGUF files through :mod:`.gguf`, transformers folders, and
:func:`load` for an embedded real model). :mod:`.registry` is
the static table of architectures, :mod:`.checkpoint` the safetensors checkpoints
(:func:`save_model`, :func:`load_model`; no pickle is ever read), :mod:`.common` what they
share. Language models follow nanoGPT's ``forward(idx, targets=None) -> (logits, loss)`` and
decode through :class:`ferrolm.decoding.Decoder`; their pure-torch twins are in
:mod:`ferrolm.testing.reference`.

Example:
    >>> import torch
    >>> from ferrolm.models import GPT, GPTConfig
    >>> model = GPT(GPTConfig(vocab_size=100, block_size=32, n_layer=2, n_head=2, n_embd=16))
    >>> logits, loss = model(torch.randint(0, 100, (2, 8)), targets=torch.randint(0, 100, (2, 8)))
    >>> logits.shape
    torch.Size([2, 8, 100])
"""

from __future__ import annotations

from .attention_lstm import AttentionLSTM, AttentionLSTMConfig
from .checkpoint import load_model, save_model
from .classifier import ClassifierConfig, SequenceClassifier
from .common import check_ids, lm_loss, pool
from .gpt import GPT, GPTConfig
from .llama import Llama, LlamaConfig, load
from .lstm import LSTMConfig, LSTMLanguageModel
from .registry import ARCHITECTURES, config_from_dict
from .seq2seq import Seq2SeqLSTM, Seq2SeqLSTMConfig, Seq2SeqTransformer, Seq2SeqTransformerConfig

__all__ = [
    "GPTConfig",
    "LSTMConfig",
    "ClassifierConfig",
    "GPT",
    "LSTMLanguageModel",
    "SequenceClassifier",
    "save_model",
    "load_model",
    "config_from_dict",
    "ARCHITECTURES",
    "Seq2SeqTransformerConfig",
    "Seq2SeqLSTMConfig",
    "AttentionLSTMConfig",
    "Seq2SeqTransformer",
    "Seq2SeqLSTM",
    "AttentionLSTM",
    "LlamaConfig",
    "Llama",
    "load",
    "check_ids",
    "lm_loss",
    "pool",
]
