"""In-context-learning workloads: multiple-choice scoring as in k-shot evaluation, 4 choices after 8 demonstrations,
either retrieved per question (different contexts) or fixed (one prefix shared by all). ferrolm's
:class:`~ferrolm.icl.LM` runs each question's shared context once (and a prefix common to all questions once) and
scores the choices from its KV cache; the peer is the same evaluation done the plain way with transformers (each
choice a full forward of context + choice, the 4 choices of a question batched with an attention mask), on the same
GPT-2-shaped weights.
"""

from __future__ import annotations

from typing import Dict, Iterator, List

from ..harness import Result, Workload, measure

__all__ = ["icl_workloads", "run"]


def icl_workloads(smoke: bool = False, full: bool = False) -> List[Workload]:
    """The two scoring comparisons (retrieved and fixed demonstrations) on a 6x384 GPT-2 shape, 8 questions (16 with
    ``full``; 2 on a one-layer model with ``smoke``), sized in questions; empty when transformers is not installed."""
    import torch

    try:
        import transformers
    except ImportError:
        return []
    from ...icl import LM
    from ...models import GPT

    g = torch.Generator().manual_seed(0)
    if smoke:
        hcfg, questions, shot_len = dict(n_layer=1, n_embd=32, n_head=2, vocab_size=512), 2, 6
    else:
        hcfg, questions, shot_len = dict(n_layer=6, n_embd=384, n_head=6), (16 if full else 8), 30
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hcfg, bos_token_id=None, eos_token_id=None)).eval()
    ours = GPT.from_hf_gpt2(hf).eval()
    V = hf.config.vocab_size
    demo_pool = [torch.randint(0, V, (shot_len,), generator=g).tolist() for _ in range(32)]
    lm = LM(ours)

    def requests(same_demos: bool):
        reqs = []
        for q in range(questions):
            picks = range(8) if same_demos else torch.randperm(32, generator=g)[:8].tolist()
            ctx = [t for i in picks for t in demo_pool[i]] + torch.randint(0, V, (20,), generator=g).tolist()
            for _c in range(4):
                n = int(torch.randint(1, 4, (1,), generator=g))
                reqs.append((ctx, torch.randint(0, V, (n,), generator=g).tolist()))
        return reqs

    def run_hf(reqs):
        out = []
        with torch.no_grad():
            for q in range(0, len(reqs), 4):
                rows = [c + t for c, t in reqs[q : q + 4]]
                T = max(len(r) for r in rows)
                ids = torch.zeros(len(rows), T, dtype=torch.long)
                mask = torch.zeros(len(rows), T, dtype=torch.long)
                for i, r in enumerate(rows):
                    ids[i, : len(r)] = torch.tensor(r)
                    mask[i, : len(r)] = 1
                logp = torch.log_softmax(hf(input_ids=ids, attention_mask=mask).logits, -1)
                for i, (c, t) in enumerate(reqs[q : q + 4]):
                    pos = torch.arange(len(c) - 1, len(c) - 1 + len(t))
                    out.append(float(logp[i, pos, torch.tensor(t)].sum()))
        return out

    shape = f"{hcfg['n_layer']}x{hcfg['n_embd']} V={V}"
    out = []
    for same, label in (
        (False, "demonstrations retrieved per question"),
        (True, "the same 8 demonstrations for every question"),
    ):
        reqs = requests(same)
        name = f"4-choice 8-shot scoring, {label}, GPT-2-shaped {shape}, context {len(reqs[0][0])} tokens"
        fns = {"ferrolm": (lambda r=reqs: lm.loglikelihood(r)), "transformers_naive": (lambda r=reqs: run_hf(r))}
        out.append(Workload(name, fns, f"{questions} questions", {"questions": questions}, warm=False))
    return out


def run(full: bool, repeats: int, extra: Dict[str, Dict[str, float]]) -> Iterator[Result]:
    """The icl rows of ``ferrolm bench``, each yielded as soon as it is timed (3 runs each; ``repeats`` does not
    apply to whole evaluations)."""
    for w in icl_workloads(full=full):
        yield measure("icl", w, 3)
