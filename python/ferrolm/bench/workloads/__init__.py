"""The benchmark workloads, one module per area: each builds :class:`~ferrolm.bench.harness.Workload` objects
(ferrolm and its peers on the same inputs, torch and the peers imported only when built) and has a ``run`` generator
that times them for ``ferrolm bench``; the pytest wrappers in ``benchmarks/`` build the same workloads.
"""

from __future__ import annotations

from .attention import attention_workloads
from .data import data_workloads
from .finetune import finetune_workloads
from .icl import icl_workloads
from .llama import llama_workloads
from .models import model_workloads
from .quant import quant_workloads
from .rnn import rnn_workloads
from .seq2seq import seq2seq_workloads
from .tokenizer import (
    corpus_for_bench,
    encode_texts,
    encode_workloads,
    find_data_dir,
    tokenizer_peers,
    training_data,
    training_workload,
)

__all__ = [
    "attention_workloads",
    "data_workloads",
    "finetune_workloads",
    "icl_workloads",
    "llama_workloads",
    "model_workloads",
    "quant_workloads",
    "rnn_workloads",
    "seq2seq_workloads",
    "corpus_for_bench",
    "encode_texts",
    "encode_workloads",
    "find_data_dir",
    "tokenizer_peers",
    "training_data",
    "training_workload",
]
