"""Fine-tuning workloads: one training step (forward, backward, AdamW) of LoRA (r=8 on the attention and MLP
projections) against full fine-tuning of the same GPT on the same batch. The size column gives the trainable
parameters, the gradient + Adam state each method keeps (bytes of fp32) and the peak resident memory its first two
steps added (measured).
"""

from __future__ import annotations

from typing import Dict, Iterator, List

from ..harness import Result, Workload, measure
from .models import train_step

__all__ = ["finetune_workloads", "run"]


def finetune_workloads(smoke: bool = False, full: bool = False) -> List[Workload]:
    """The LoRA-vs-full step on a 6x384 GPT at T=256, B=8 (a one-layer, 32-wide GPT with ``smoke``; ``full`` changes
    nothing); a whole operation (no warm run before timing)."""
    import torch

    from ..._memory import PeakMemory
    from ...finetune import apply_lora, prepare, trainable_parameters
    from ...models import GPT, GPTConfig

    g = torch.Generator().manual_seed(0)
    if smoke:
        cfg, (b, t) = GPTConfig(vocab_size=256, block_size=32, n_layer=1, n_head=2, n_embd=32), (2, 32)
    else:
        cfg, (b, t) = GPTConfig(vocab_size=8192, block_size=256, n_layer=6, n_head=6, n_embd=384), (8, 256)
    torch.manual_seed(0)
    full_model = GPT(cfg)
    lora_model = GPT(cfg)
    lora_model.load_state_dict(full_model.state_dict())
    apply_lora(lora_model, r=8, alpha=16, target_modules=["c_attn", "c_proj", "c_fc"])
    prepare(lora_model, "lora")
    x = torch.randint(0, cfg.vocab_size, (b, t), generator=g)
    y = torch.randint(0, cfg.vocab_size, (b, t), generator=g)

    tl, total = trainable_parameters(lora_model)

    def state_mb(n: int) -> float:
        return 3 * 4 * n / 1e6  # gradient + two Adam moments, fp32

    fns = {"ferrolm": train_step(lora_model, x, y), "full_finetune": train_step(full_model, x, y)}
    peak = {}
    for key, fn in fns.items():  # the first two steps: activations, gradients and the optimizer's state appear
        with PeakMemory() as mem:
            fn()
            fn()
        peak[key] = "n/a" if mem.peak_bytes is None else f"{mem.peak_bytes / 1e6:.0f} MB"
    size = (
        f"LoRA {tl / 1e6:.2f}M trainable ({100 * tl / total:.1f}%, {state_mb(tl):.0f} MB state, "
        f"peak +{peak['ferrolm']}) vs full {total / 1e6:.1f}M ({state_mb(total):.0f} MB state, "
        f"peak +{peak['full_finetune']})"
    )
    name = f"train step, LoRA r=8 vs full fine-tuning, GPT {cfg.n_layer}x{cfg.n_embd} T={t} B={b}"
    return [Workload(name, fns, size, {"trainable": tl, "parameters": total}, warm=False)]


def run(full: bool, repeats: int, extra: Dict[str, Dict[str, float]]) -> Iterator[Result]:
    """The finetune row of ``ferrolm bench`` (3 runs; ``repeats`` does not apply to whole training steps)."""
    for w in finetune_workloads(full=full):
        yield measure("finetune", w, 3)
