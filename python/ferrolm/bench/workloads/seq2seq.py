"""Encoder-decoder workloads on the embedded translation task (English -> French number words, ferrolm's BPE):
training steps of ferrolm's Seq2SeqTransformer against the same model on ``torch.nn.Transformer`` (SDPA inside;
:class:`ferrolm.testing.reference.Seq2SeqTransformer`, same weights, same batches, dropout 0.1 as torch.nn.Transformer's
default; sized in real tokens, so the ratio is the ratio of real tokens/s), and greedy translation of 32 sources at
once with the KV cache and cross-attention keys computed once, against the reference decoding without a cache (the
whole model re-run on the target prefix at every step).
"""

from __future__ import annotations

from typing import Dict, Iterator, List

from ..harness import Result, Workload, measure

__all__ = ["seq2seq_workloads", "run"]


def seq2seq_workloads(smoke: bool = False, full: bool = False) -> List[Workload]:
    """The seq2seq comparisons: eight training steps of 128 pairs (3+3 layers x 256; 6+6 x 512 with ``full``), and
    greedy translation of 32 sources, 24 new tokens each; whole operations (no warm run before timing).

    Args:
        smoke: 2 steps of 16 pairs and 8 sources of 8 tokens on a one-layer, 32-wide model.
        full: the 6+6 layers x 512 model.
    """
    import torch

    from ...decoding import decode_uncached, greedy_decode
    from ...models import Seq2SeqTransformer, Seq2SeqTransformerConfig
    from ...recipes.translation import encode_pairs, number_task, special_ids, train_tokenizer
    from ...testing import reference
    from ...training import Seq2SeqBatches

    task = number_task(n_train=2_000 if smoke else 20_000, n_valid=10, n_test=64)
    tok = train_tokenizer(task.train, 512)
    ids = special_ids(tok)
    B, n_batches = (16, 2) if smoke else (128, 8)
    batches = Seq2SeqBatches(encode_pairs(tok, task.train), B, **ids, seed=0)
    data = [batches.next() for _ in range(n_batches)]
    real = sum(int((s != ids["pad_id"]).sum()) + int((y != -100).sum()) for (s, _), y in data)
    if smoke:
        sizes = dict(n_layer=1, n_head=2, n_embd=32, ff_size=64)
    elif full:
        sizes = dict(n_layer=6, n_head=8, n_embd=512, ff_size=2048)
    else:
        sizes = dict(n_layer=3, n_head=4, n_embd=256, ff_size=1024)
    cfg = Seq2SeqTransformerConfig(
        src_vocab_size=tok.n_vocab,
        tgt_vocab_size=tok.n_vocab,
        max_len=64,
        dropout=0.1,
        norm_first=True,
        shared_embeddings=True,
        tie_output=True,
        **ids,
        **sizes,
    )
    torch.manual_seed(0)
    ours = Seq2SeqTransformer(cfg)
    ref = reference.Seq2SeqTransformer(cfg)
    ref.load_state_dict(ours.state_dict())

    def steps(model):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def run() -> None:
            model.train()  # dropout 0.1 on both sides, torch.nn.Transformer's default
            for (src, tgt), y in data:
                _, loss = model(src, tgt, targets=y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)

        return run

    shape = f"{cfg.n_layer}+{cfg.n_layer} layers x {cfg.n_embd}"
    out = [
        Workload(
            f"seq2seq Transformer training, {shape}, {n_batches} steps x {B} pairs (embedded task)",
            {"ferrolm": steps(ours), "torch.nn.Transformer": steps(ref)},
            f"{real} tokens",
            {"tokens": real},
            warm=False,
        )
    ]
    sources = [s for s, _ in encode_pairs(tok, task.test[: 8 if smoke else 32])]
    new = 8 if smoke else 24
    out.append(
        Workload(
            f"seq2seq greedy translation, batch {len(sources)}, {new} tokens, KV cache vs none, {shape}",
            {
                "ferrolm": lambda: greedy_decode(ours, sources, new, batch_size=32),
                "no_cache": lambda: decode_uncached(ref, sources, new),
            },
            f"{len(sources)} tokens",
            {"tokens": len(sources)},
            warm=False,
        )
    )
    return out


def run(full: bool, repeats: int, extra: Dict[str, Dict[str, float]]) -> Iterator[Result]:
    """The seq2seq rows of ``ferrolm bench``, each yielded as soon as it is timed (3 runs each; ``repeats`` does not
    apply to whole training loops)."""
    for w in seq2seq_workloads(full=full):
        yield measure("seq2seq", w, 3)
