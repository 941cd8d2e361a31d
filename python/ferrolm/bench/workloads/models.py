"""End-to-end model workloads: one training step (forward, backward, AdamW) of ferrolm's GPT and LSTM language model
against their plain-PyTorch twins in :mod:`ferrolm.testing.reference` (same weights, same batch), and batch-1 greedy
generation with a KV cache against transformers' ``GPT2LMHeadModel.generate`` on the same GPT-2-shaped weights.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterator, List

from ..harness import Result, Workload, measure

__all__ = ["model_workloads", "train_step", "run"]


def train_step(model: Any, x: Any, y: Any) -> Callable[[], None]:
    """One optimizer step of ``model`` on ``(x, y)``: forward with targets, backward, AdamW on the trainable
    parameters."""
    import torch

    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def run() -> None:
        _, loss = model(x, targets=y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return run


def model_workloads(smoke: bool = False, full: bool = False) -> List[Workload]:
    """The model comparisons, sized in tokens per call; each call is a whole operation (no warm run before timing).

    Args:
        smoke: one-layer, 32-wide models, for a run that only checks the workloads work.
        full: generation on a 12x768 GPT-2 shape with 64 new tokens instead of 6x384 and 32.

    The generation workload is left out when transformers is not installed.
    """
    import torch

    from ...decoding import generate
    from ...models import GPT, GPTConfig, LSTMConfig, LSTMLanguageModel
    from ...testing import reference

    g = torch.Generator().manual_seed(0)
    out: List[Workload] = []
    V = 512 if smoke else 8192

    if smoke:
        gcfg, (gb, gt) = GPTConfig(vocab_size=V, block_size=32, n_layer=1, n_head=2, n_embd=32), (2, 32)
        lcfg, (lb, lt) = LSTMConfig(vocab_size=V, n_embd=32, hidden_size=32, num_layers=2), (4, 16)
    else:
        gcfg, (gb, gt) = GPTConfig(vocab_size=V, block_size=256, n_layer=6, n_head=6, n_embd=384), (8, 256)
        lcfg, (lb, lt) = LSTMConfig(vocab_size=V, n_embd=512, hidden_size=512, num_layers=2), (16, 128)
    for label, cfg, ours_cls, ref_cls, (b, t) in (
        (f"GPT {gcfg.n_layer}x{gcfg.n_embd} T={gt} B={gb} V={V}", gcfg, GPT, reference.GPT, (gb, gt)),
        (
            f"LSTM LM {lcfg.num_layers}x{lcfg.hidden_size} T={lt} B={lb} V={V}",
            lcfg,
            LSTMLanguageModel,
            reference.LSTMLanguageModel,
            (lb, lt),
        ),
    ):
        torch.manual_seed(0)
        ours = ours_cls(cfg)
        ref = ref_cls(cfg)
        ref.load_state_dict(ours.state_dict())
        x = torch.randint(0, V, (b, t), generator=g)
        y = torch.randint(0, V, (b, t), generator=g)
        fns = {"ferrolm": train_step(ours, x, y), "reference": train_step(ref, x, y)}
        out.append(Workload(f"train step {label}", fns, f"{b * t} tokens", {"tokens": b * t}, warm=False))
    try:
        import transformers
    except ImportError:
        return out
    if smoke:
        hcfg, new, plen = dict(n_layer=1, n_embd=32, n_head=2, vocab_size=V), 4, 8
    elif full:
        hcfg, new, plen = dict(n_layer=12, n_embd=768, n_head=12), 64, 32
    else:
        hcfg, new, plen = dict(n_layer=6, n_embd=384, n_head=6), 32, 32
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hcfg, bos_token_id=None, eos_token_id=None)).eval()
    ours = GPT.from_hf_gpt2(hf).eval()
    prompt = torch.randint(0, hf.config.vocab_size, (1, plen), generator=g)
    mask = torch.ones_like(prompt)

    def gen_ours():
        return generate(ours, prompt, new, temperature=0)

    def gen_hf():
        with torch.no_grad():
            return hf.generate(
                prompt, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0
            )

    shape = f"{hcfg['n_layer']}x{hcfg['n_embd']} V={hf.config.vocab_size}"
    out.append(
        Workload(
            f"generate B=1 greedy, GPT-2-shaped {shape}, prompt {plen} + {new} new tokens",
            {"ferrolm": gen_ours, "transformers": gen_hf},
            f"{new} tokens",
            {"tokens": new},
            warm=False,
        )
    )
    return out


def run(full: bool, repeats: int, extra: Dict[str, Dict[str, float]]) -> Iterator[Result]:
    """The models rows of ``ferrolm bench``, each yielded as soon as it is timed (3 runs with ``full``, else 2;
    ``repeats`` does not apply to whole training steps)."""
    for w in model_workloads(full=full):
        yield measure("models", w, 3 if full else 2)
