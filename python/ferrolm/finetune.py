"""Lightweight fine-tuning (轻量级微调): LoRA, BitFit, head-only and full fine-tuning of
ferrolm's models through one interface, with PEFT-compatible LoRA adapters.

- :func:`apply_lora` replaces the targeted ``nn.Linear`` layers by :class:`LoRALinear`
  (``W x + b + (alpha / r) * B A dropout(x)``, ``B`` zero-initialised so a fresh adapter
  changes nothing); ``merge_lora`` / ``unmerge_lora`` fold the update into ``W`` and back.
- :func:`apply_lora_rnn` puts the same low-rank update on LSTM/GRU weight matrices.
- :class:`PromptTuning` prepends trainable virtual tokens to a GPT's inputs.
- :func:`apply_ia3` puts (IA)³ (Liu et al. 2022, T-Few) on a model: :class:`IA3Linear` multiplies
  a layer's output (keys, values) or, for a feed-forward layer, its input (the MLP's intermediate
  activation) by a learned vector that starts at ones; :func:`save_ia3` / :func:`load_ia3` use
  PEFT's ``IA3`` layout (``base_model.model.<module>.ia3_l``), both ways.
- :func:`prepare` sets which parameters train for a method (``"lora"``, ``"ia3"``, ``"bitfit"``,
  ``"head"``, ``"full"``, ``"prompt"``) and freezes the rest (``requires_grad=False``: no gradient and, with
  :func:`ferrolm.training.make_optimizer`, no optimizer state).
- :func:`save_lora` / :func:`load_lora` use PEFT's layout (``adapter_config.json`` +
  ``adapter_model.safetensors``, keys ``base_model.model.<module>.lora_A.weight``). For a GPT
  converted from GPT-2 the module names are GPT-2's, and GPT-2's ``Conv1D`` (``y = x W + b``,
  ``fan_in_fan_out``) has the same LoRA factors as ``nn.Linear``, so
  ``peft.PeftModel.from_pretrained`` loads ferrolm's adapter on the matching
  ``GPT2LMHeadModel`` and ferrolm loads PEFT's.

Example:
    >>> from ferrolm.models import GPT, GPTConfig
    >>> model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16))
    >>> _ = apply_lora(model, r=4, alpha=8, target_modules=["c_attn"])
    >>> prepare(model, "lora")
    >>> trainable_parameters(model)[0]  # 2 layers x (A 4x16 + B 48x4)
    512
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ._io import PathLike, atomic_write
from .errors import FormatError
from .models import GPT, Llama
from .models.common import lm_loss

__all__ = [
    "LoRALinear",
    "IA3Linear",
    "PromptTuning",
    "apply_lora",
    "merge_lora",
    "unmerge_lora",
    "merge_and_unload",
    "apply_lora_rnn",
    "merge_lora_rnn",
    "prepare",
    "trainable_parameters",
    "print_trainable_parameters",
    "save_lora",
    "load_lora",
    "apply_ia3",
    "save_ia3",
    "load_ia3",
    "IA3_TARGETS",
    "METHODS",
]

METHODS = ("lora", "ia3", "bitfit", "head", "full", "prompt")


class PromptTuning(nn.Module):
    """Prompt tuning (Lester et al. 2021): ``n_virtual`` trainable vectors placed before every
    input of a ferrolm :class:`~ferrolm.models.GPT` or :class:`~ferrolm.models.Llama`; the model
    itself stays frozen.

    ``forward(idx, targets=None, lengths=None) -> (logits (B, T, V), loss)`` over the real
    tokens only. The vectors start as the embeddings of ``init_ids`` (default: the first
    ``n_virtual`` ids of ``seed``'s random draw from the vocabulary), as PEFT's "from vocabulary"
    initialisation does.
    """

    def __init__(
        self, model: nn.Module, n_virtual: int, init_ids: Optional[Sequence[int]] = None, seed: int = 0
    ) -> None:
        super().__init__()
        if not isinstance(model, (GPT, Llama)):
            raise TypeError(f"prompt tuning needs a ferrolm GPT or Llama, got {type(model).__name__}")
        if not isinstance(n_virtual, int) or n_virtual <= 0:
            raise ValueError(f"n_virtual must be a positive int, got {n_virtual!r}")
        if n_virtual >= model.config.block_size:
            raise ValueError(f"n_virtual={n_virtual} leaves no room in block_size={model.config.block_size}")
        self.model = model
        self.n_virtual = n_virtual
        if init_ids is None:
            g = torch.Generator().manual_seed(seed)
            init_ids = torch.randint(0, model.config.vocab_size, (n_virtual,), generator=g).tolist()
        if len(init_ids) != n_virtual:
            raise ValueError(f"init_ids has {len(init_ids)} ids for {n_virtual} virtual tokens")
        w = model.transformer.wte.weight if isinstance(model, GPT) else model.model.embed_tokens.weight
        self.prompt = nn.Parameter(w.detach()[torch.tensor(list(init_ids), device=w.device)].clone())

    @property
    def config(self):
        return self.model.config

    def hidden_states(self, idx: torch.Tensor, lengths=None) -> torch.Tensor:
        """(B, T, C) hidden states of the real tokens (the virtual ones are dropped)."""
        if isinstance(self.model, GPT):
            return self.model.hidden_states(idx, lengths=lengths, prefix_embeds=self.prompt)[:, self.n_virtual :]
        B = idx.size(0)  # a Llama: right pads after the real tokens change nothing (causal)
        x = torch.cat([self.prompt[None].expand(B, -1, -1), self.model.model.embed_tokens(idx)], 1)
        return self.model.hidden_states(None, inputs_embeds=x)[:, self.n_virtual :]

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, lengths=None):
        logits = self.model.lm_head(self.hidden_states(idx, lengths))
        return logits, (lm_loss(logits, targets) if targets is not None else None)

    # ---- decoding (the protocol of ferrolm.decoding.Decoder): the virtual tokens run once into
    # the KV cache, then tokens decode after them as with the plain GPT.

    window_name = "block_size - n_virtual"

    @property
    def context_window(self) -> int:
        """The real tokens that fit: ``block_size - n_virtual``."""
        return self.model.config.block_size - self.n_virtual

    def start(self, batch: int, capacity: int, memory=None):
        """The GPT's KV caches with the virtual tokens already in them (``capacity`` real tokens
        after them)."""
        state = self.model.start(batch, capacity + self.n_virtual, memory)
        self.model.hidden_states(None, cache=state, inputs_embeds=self.prompt[None].expand(batch, -1, -1))
        return state

    def advance(self, state, idx: torch.Tensor, lengths=None) -> torch.Tensor:
        return self.model.advance(state, idx, lengths)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.logits(hidden)

    def select(self, state, rows: torch.Tensor):
        return self.model.select(state, rows)


def _check_rank(r: int, alpha: float) -> None:
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise ValueError(f"LoRA rank r must be a positive int, got {r!r}")
    if not alpha > 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha}")


def _is_conv1d(m: nn.Module) -> bool:
    """GPT-2's ``Conv1D`` (transformers): ``y = x W + b`` with W stored (in, out)."""
    return (
        type(m).__name__ == "Conv1D"
        and hasattr(m, "nf")
        and getattr(m, "weight", None) is not None
        and m.weight.dim() == 2
    )


def _is_lora_target(m: nn.Module) -> bool:
    from .quant import QuantLinear

    return isinstance(m, (nn.Linear, QuantLinear)) or _is_conv1d(m)


def _in_out(layer: nn.Module) -> Tuple[int, int]:
    """``(in_features, out_features)`` of an ``nn.Linear``, a ``QuantLinear`` or GPT-2's
    ``Conv1D`` (whose weight is stored (in, out))."""
    if _is_conv1d(layer):
        n_in, n_out = layer.weight.shape
        return int(n_in), int(n_out)
    return int(layer.in_features), int(layer.out_features)


class LoRALinear(nn.Module):
    """An ``nn.Linear`` (or GPT-2's ``Conv1D``, whose weight is stored transposed: PEFT's
    ``fan_in_fan_out``) with a low-rank update: ``base(x) + (alpha / r) * lora_B(lora_A(drop(x)))``.

    The base layer stays a child (``base``) with its own weight and bias; ``lora_A`` is
    Kaiming-uniform initialised and ``lora_B`` zero, as in the LoRA paper and PEFT.
    """

    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if not _is_lora_target(base):
            raise TypeError(f"LoRA wraps nn.Linear or GPT-2 Conv1D layers, got {type(base).__name__}")
        _check_rank(r, alpha)
        self.base = base
        self.fan_in_fan_out = _is_conv1d(base)
        self.r, self.alpha = r, float(alpha)
        self.scaling = self.alpha / r
        from .quant import QuantLinear

        if isinstance(base, QuantLinear):
            # QLoRA: a frozen block-quantized base, float32 adapters.
            dev, dt = base.qweight.device, torch.float32
            n_in, n_out = base.in_features, base.out_features
        else:
            dev, dt = base.weight.device, base.weight.dtype
            n_in, n_out = _in_out(base)
        self.lora_A = nn.Linear(n_in, r, bias=False, device=dev, dtype=dt)
        self.lora_B = nn.Linear(r, n_out, bias=False, device=dev, dtype=dt)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:  # so code that reads layer.weight keeps working
        return self.base.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base.bias

    def delta(self) -> torch.Tensor:
        """The weight update ``scaling * B A``, in the base weight's layout ((out, in), or
        (in, out) for a Conv1D)."""
        d = (self.lora_B.weight @ self.lora_A.weight) * self.scaling
        return d.t() if self.fan_in_fan_out else d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def folded(self, attr: str) -> torch.Tensor:
        """The base's ``weight`` or ``bias`` with the update folded in (the layer unchanged)."""
        value = getattr(self.base, attr)
        return value + self.delta().to(value.dtype) if attr == "weight" and not self.merged else value

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise ValueError("this LoRA layer is already merged; unmerge it first")
        if not isinstance(getattr(self.base, "weight", None), nn.Parameter):
            raise ValueError(
                f"cannot merge LoRA into a quantized base ({self.base!r}): its weight is frozen blocks; "
                "load the model with dequantize=True to merge, or keep the adapter apart"
            )
        self.base.weight += self.delta().to(self.base.weight.dtype)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise ValueError("this LoRA layer is not merged")
        self.base.weight -= self.delta().to(self.base.weight.dtype)
        self.merged = False


class IA3Linear(nn.Module):
    """(IA)³ (Liu et al. 2022): an ``nn.Linear``, ``QuantLinear`` or GPT-2 ``Conv1D`` whose output
    is multiplied by a learned vector, ``base(x) * l`` (keys, values), or, as a feed-forward layer,
    whose input is: ``base(x * l)`` (the input of an MLP's down projection is its intermediate
    activation). ``l`` (``ia3_l``, one value per output or input feature) starts at ones, so a
    fresh layer changes nothing — PEFT's ``IA3`` computes the same.

    Args:
        base: the layer to scale (stays a child, ``base``, with its own weight and bias).
        feedforward: scale the input instead of the output.
    """

    def __init__(self, base: nn.Module, feedforward: bool = False) -> None:
        super().__init__()
        if not _is_lora_target(base):
            raise TypeError(f"(IA)³ wraps nn.Linear, QuantLinear or GPT-2 Conv1D layers, got {type(base).__name__}")
        from .quant import QuantLinear

        self.base = base
        self.feedforward = bool(feedforward)
        self.fan_in_fan_out = _is_conv1d(base)
        n_in, n_out = _in_out(base)
        if isinstance(base, QuantLinear):
            dev, dt = base.qweight.device, torch.float32
        else:
            dev, dt = base.weight.device, base.weight.dtype
        self.ia3_l = nn.Parameter(torch.ones(n_in if self.feedforward else n_out, device=dev, dtype=dt))
        self.merged = False

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    @property
    def bias(self) -> Optional[torch.Tensor]:
        return self.base.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if self.feedforward:
            return self.base(x * self.ia3_l.to(x.dtype))
        y = self.base(x)
        return y * self.ia3_l.to(y.dtype)

    def _weight_scale(self) -> torch.Tensor:
        """``l`` shaped to broadcast over the base weight ((out, in), or (in, out) for Conv1D)."""
        columns = self.feedforward != self.fan_in_fan_out
        return self.ia3_l[None, :] if columns else self.ia3_l[:, None]

    def folded(self, attr: str) -> torch.Tensor:
        """The base's ``weight`` or ``bias`` with the scaling folded in (the layer unchanged): the
        weight's rows (output scaling, bias too) or columns (feed-forward) times ``l``."""
        value = getattr(self.base, attr)
        if self.merged or value is None or (attr == "bias" and self.feedforward):
            return value
        scale = self._weight_scale() if attr == "weight" else self.ia3_l
        return value * scale.to(value.dtype)

    def _check_float_base(self) -> None:
        if not isinstance(getattr(self.base, "weight", None), nn.Parameter):
            raise ValueError(
                f"cannot merge (IA)³ into a quantized base ({self.base!r}): its weight is frozen blocks; "
                "load the model with dequantize=True to merge, or keep the adapter apart (save_ia3)"
            )

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            raise ValueError("this (IA)³ layer is already merged; unmerge it first")
        self._check_float_base()
        w, b = self.folded("weight"), self.folded("bias")
        self.base.weight.copy_(w)
        if b is not None:
            self.base.bias.copy_(b)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise ValueError("this (IA)³ layer is not merged")
        if bool((self.ia3_l == 0).any()):
            raise ValueError("cannot unmerge an (IA)³ layer with a zero scale: the merged weight lost those features")
        self.base.weight.div_(self._weight_scale().to(self.base.weight.dtype))
        if self.base.bias is not None and not self.feedforward:
            self.base.bias.div_(self.ia3_l.to(self.base.bias.dtype))
        self.merged = False


class _LowRankDelta(nn.Module):
    """A parametrization ``W -> W + (alpha / r) * B A`` for a recurrent weight matrix
    (``weight_ih_l0``, ``weight_hh_l0_reverse``, ...): the ferrolm LSTM/GRU kernels read the
    parametrized weight and their weight gradient flows on to ``A`` and ``B``."""

    def __init__(self, shape: Tuple[int, int], r: int, alpha: float, device, dtype) -> None:
        super().__init__()
        out_f, in_f = shape
        self.r, self.alpha, self.scaling = r, float(alpha), float(alpha) / r
        self.lora_A = nn.Parameter(torch.empty(r, in_f, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(out_f, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + (self.lora_B @ self.lora_A) * self.scaling


def apply_lora_rnn(
    rnn: nn.Module, r: int = 8, alpha: float = 16.0, weights: Sequence[str] = ("weight_ih", "weight_hh")
) -> List[str]:
    """LoRA on the weight matrices of an LSTM/GRU (ferrolm's or torch's): every parameter whose
    name starts with one of ``weights`` gets a low-rank update through
    ``torch.nn.utils.parametrize``; returns their names. :func:`prepare` with ``"lora"``
    trains the factors; :func:`merge_lora_rnn` folds them in.

    Raises:
        ValueError: not a recurrent layer, nothing matched, r <= 0, alpha <= 0.
    """
    from torch.nn.utils import parametrize

    if not isinstance(rnn, nn.RNNBase):
        raise TypeError(f"apply_lora_rnn takes an LSTM or GRU layer, got {type(rnn).__name__}")
    _check_rank(r, alpha)
    names = [n for n, _ in rnn.named_parameters(recurse=False) if n.startswith(tuple(weights))]
    if not names:
        have = sorted(n for n, _ in rnn.named_parameters(recurse=False))
        raise ValueError(f"weights {list(weights)} match no parameter; the layer has {have}")
    for n in names:
        w = getattr(rnn, n)
        parametrize.register_parametrization(rnn, n, _LowRankDelta(tuple(w.shape), r, alpha, w.device, w.dtype))
    return names


def merge_lora_rnn(rnn: nn.Module) -> None:
    """Folds the low-rank updates of :func:`apply_lora_rnn` into the weights and removes the
    parametrizations (the layer is a plain LSTM/GRU again, same outputs)."""
    from torch.nn.utils import parametrize

    if not parametrize.is_parametrized(rnn):
        raise ValueError("this recurrent layer has no LoRA parametrization (apply_lora_rnn first)")
    for n in list(rnn.parametrizations.keys()):
        parametrize.remove_parametrizations(rnn, n, leave_parametrized=True)


def _matches(name: str, patterns: Sequence[str]) -> bool:
    """PEFT's rule: a pattern matches a module whose name is it or ends with ``.`` + it; a
    pattern with regex characters is matched against the whole name."""
    for p in patterns:
        if any(ch in p for ch in "*^$[]()|?+\\"):
            if re.fullmatch(p, name):
                return True
        elif name == p or name.endswith("." + p):
            return True
    return False


def _chosen_linears(model: nn.Module, patterns: Sequence[str]) -> Tuple[Dict[str, nn.Module], List[str]]:
    """(every linear layer by name, the names matching ``patterns``); ValueError listing the
    layer names when none matches."""
    linears = {n: m for n, m in model.named_modules() if _is_lora_target(m)}
    chosen = [n for n in linears if _matches(n, patterns)]
    if not chosen:
        names = sorted({n.split(".")[-1] for n in linears})
        raise ValueError(
            f"target_modules {list(patterns)} match no nn.Linear; the model's linear layers are named {names}"
        )
    return linears, chosen


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply_lora(
    model: nn.Module, r: int = 8, alpha: float = 16.0, target_modules: Sequence[str] = ("c_attn",), dropout: float = 0.0
) -> List[str]:
    """Wraps every ``nn.Linear`` (or GPT-2 ``Conv1D``, as in a transformers
    ``GPT2LMHeadModel``) whose name matches ``target_modules`` in a :class:`LoRALinear`;
    returns the wrapped names.

    Raises:
        ValueError: a pattern matching no linear layer (the message lists the ones that exist),
            r <= 0 or alpha <= 0, LoRA already applied.
    """
    if isinstance(target_modules, str):
        target_modules = [target_modules]
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA layers")
    if any(isinstance(m, IA3Linear) for m in model.modules()):
        raise ValueError("the model has (IA)³ layers; LoRA and (IA)³ on one model are not supported")
    linears, chosen = _chosen_linears(model, target_modules)
    for name in chosen:
        _set_module(model, name, LoRALinear(linears[name], r, alpha, dropout))
    model.lora_config = {"r": r, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": list(target_modules)}  # type: ignore[attr-defined]
    return chosen


def _lora_layers(model: nn.Module) -> List[Tuple[str, LoRALinear]]:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    if not layers:
        raise ValueError("the model has no LoRA layers (apply_lora first)")
    return layers


def merge_lora(model: nn.Module) -> None:
    """Folds every LoRA update into its base weight (outputs unchanged, no extra compute)."""
    for _, m in _lora_layers(model):
        m.merge()


def unmerge_lora(model: nn.Module) -> None:
    """Takes the merged updates back out of the base weights."""
    for _, m in _lora_layers(model):
        m.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merges every LoRA or (IA)³ update and puts the plain ``nn.Linear`` layers back, so the
    model has its original architecture and parameter names again (savable with ``save_model``)."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (LoRALinear, IA3Linear))]
    if not layers:
        raise ValueError("the model has no LoRA or (IA)³ layers (apply_lora or apply_ia3 first)")
    for name, m in layers:
        if not m.merged:
            m.merge()
        _set_module(model, name, m.base)
    for attr in ("lora_config", "ia3_config"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


def _head_names(model: nn.Module) -> List[str]:
    for attr in ("head", "lm_head"):
        if isinstance(getattr(model, attr, None), nn.Module):
            return [attr]
    raise ValueError(f"{type(model).__name__} has no 'head' or 'lm_head' module for head-only training")


def prepare(model: nn.Module, method: str) -> None:
    """Sets ``requires_grad`` for a fine-tuning method; everything else is frozen.

    - ``"lora"``: the LoRA factors only (plus a classifier's head when the model has ``head``
      and a ``backbone``, as PEFT's ``modules_to_save``).
    - ``"ia3"``: the (IA)³ vectors only (plus a classifier's head), after :func:`apply_ia3`.
    - ``"bitfit"``: every bias (Ben Zaken et al.), plus a classifier's head.
    - ``"head"``: the output head only (a linear probe).
    - ``"full"``: every parameter.
    - ``"prompt"``: the virtual tokens of a :class:`PromptTuning` wrapper only.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if method == "prompt":
        if not isinstance(model, PromptTuning):
            raise ValueError(
                "method 'prompt' needs a PromptTuning wrapper: prepare(PromptTuning(gpt, n_virtual), 'prompt')"
            )
        for name, p in model.named_parameters():
            p.requires_grad_(name == "prompt")
        return
    is_classifier = hasattr(model, "backbone") and isinstance(getattr(model, "head", None), nn.Module)
    heads = _head_names(model) if method == "head" or is_classifier else []
    # By identity, not name: a head tied to the embedding is listed once, under the embedding's
    # name (training a tied head trains the shared matrix).
    head_ids = {id(p) for h in heads for p in getattr(model, h).parameters()}
    for name, p in model.named_parameters():
        if method == "full":
            on = True
        elif method == "lora":
            on = (
                ".lora_A." in name
                or ".lora_B." in name
                or name.endswith((".lora_A", ".lora_B"))
                or (is_classifier and id(p) in head_ids)
            )
        elif method == "ia3":
            on = name.endswith(".ia3_l") or (is_classifier and id(p) in head_ids)
        elif method == "bitfit":
            on = name.endswith("bias") or (is_classifier and id(p) in head_ids)
        else:
            on = id(p) in head_ids
        p.requires_grad_(on)
    if method == "lora" and not any(isinstance(m, _LowRankDelta) for m in model.modules()):
        _lora_layers(model)  # raises when there is nothing to train
    if method == "ia3" and not any(isinstance(m, IA3Linear) for m in model.modules()):
        raise ValueError("the model has no (IA)³ layers (apply_ia3 first)")


def trainable_parameters(model: nn.Module) -> Tuple[int, int]:
    """``(trainable, total)`` parameter counts, tied tensors counted once; a quantized layer's
    frozen weight (:mod:`ferrolm.quant`) counts as its values."""
    seen, trainable, total = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    for m in model.modules():
        q = getattr(m, "qweight", None)
        if isinstance(q, torch.Tensor) and q.data_ptr() not in seen:
            seen.add(q.data_ptr())
            total += m.weight_numel() if hasattr(m, "weight_numel") else 0
    return trainable, total


def print_trainable_parameters(model: nn.Module) -> None:
    """PEFT's one-line summary: trainable params, all params, trainable %."""
    t, n = trainable_parameters(model)
    print(f"trainable params: {t:,} || all params: {n:,} || trainable%: {100 * t / max(1, n):.4f}")


# --------------------------------------------------------------------------- PEFT layout

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def save_lora(model: nn.Module, out_dir: PathLike) -> Path:
    """Writes the LoRA factors in PEFT's layout (atomically, file by file)."""
    layers = _lora_layers(model)
    cfg = getattr(model, "lora_config", None) or {}
    first = layers[0][1]
    tensors = {}
    for name, m in layers:
        tensors[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.weight.detach().cpu().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = m.lora_B.weight.detach().cpu().contiguous()
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": first.r,
        "lora_alpha": first.alpha,
        "lora_dropout": cfg.get("lora_dropout", 0.0),
        "target_modules": sorted({n.split(".")[-1] for n, _ in layers}),
        "fan_in_fan_out": any(m.fan_in_fan_out for _, m in layers),  # GPT-2's Conv1D stores (in, out)
        "bias": "none",
        "inference_mode": True,
        "base_model_name_or_path": None,
        "modules_to_save": None,
        "init_lora_weights": True,
    }
    return _write_adapter(out_dir, tensors, config)


def _write_adapter(out_dir: PathLike, tensors: Dict[str, torch.Tensor], config: Dict) -> Path:
    """``adapter_model.safetensors`` and ``adapter_config.json`` in ``out_dir``, each written atomically."""
    from safetensors.torch import save

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / ADAPTER_WEIGHTS, save(tensors, metadata={"format": "pt"}))
    atomic_write(out / ADAPTER_CONFIG, json.dumps(config, indent=2).encode())
    return out


def _adapter_dir(adapter_dir: PathLike) -> Path:
    """``adapter_dir`` as a Path (FileNotFoundError unless it holds both adapter files)."""
    d = Path(adapter_dir)
    if not (d / ADAPTER_CONFIG).is_file() or not (d / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"{d} has no {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS}")
    return d


def _peft_config(path: Path, peft_type: str, loader: str) -> Dict:
    """``adapter_config.json`` as a dict, checked to be a JSON object of ``peft_type``."""
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise FormatError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise FormatError(f"{path} must hold a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type") != peft_type:
        raise FormatError(
            f"{path} describes a {cfg.get('peft_type')!r} adapter; {loader} loads {peft_type!r} adapters"
            + (" (use load_ia3)" if cfg.get("peft_type") == "IA3" else "")
            + (" (use load_lora)" if cfg.get("peft_type") == "LORA" else "")
        )
    return cfg


def _adapter_config(path: Path) -> Dict:
    """The checked ``adapter_config.json``: a LoRA config with a positive int ``r``, a positive
    ``lora_alpha`` and a dropout in [0, 1) (FormatError naming the file and the key)."""
    cfg = _peft_config(path, "LORA", "load_lora")
    r, alpha, dropout = cfg.get("r"), cfg.get("lora_alpha"), cfg.get("lora_dropout", 0.0)
    if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
        raise FormatError(f"{path}: 'r' must be a positive int, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
        raise FormatError(f"{path}: 'lora_alpha' must be a positive number, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        raise FormatError(f"{path}: 'lora_dropout' must be a number in [0, 1), got {dropout!r}")
    if cfg.get("bias", "none") != "none" or cfg.get("use_dora") or cfg.get("use_rslora"):
        raise ValueError(f"{path}: only plain LoRA adapters (bias='none', no DoRA / rsLoRA) are supported")
    return cfg


def _adapter_tensors(path: Path) -> Dict[str, torch.Tensor]:
    """The tensors of ``adapter_model.safetensors`` (FormatError for a corrupt file)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except (SafetensorError, ValueError, RuntimeError) as e:
        raise FormatError(f"{path} is not a valid safetensors file: {e}") from None


def load_lora(model: nn.Module, adapter_dir: PathLike) -> List[str]:
    """Applies a LoRA adapter saved by :func:`save_lora` or by PEFT (``PeftModel.save_pretrained``
    of a GPT-2 or Llama LoRA) to ``model``; returns the adapted module names.

    The whole adapter (config, every factor's presence, rank, dtype and shape against the
    model's layers) is checked before the model is touched: a refused adapter leaves the model
    as it was.

    Raises:
        FileNotFoundError; FormatError (not a LoRA adapter, a malformed config, a corrupt or
        inconsistent weights file, naming the file); ValueError (modules or shapes that do not
        fit this model, LoRA already applied).
    """
    d = _adapter_dir(adapter_dir)
    cfg = _adapter_config(d / ADAPTER_CONFIG)
    weights = d / ADAPTER_WEIGHTS
    tensors = _adapter_tensors(weights)
    r, alpha = cfg["r"], float(cfg["lora_alpha"])
    pat = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])(?:\.[^.]+)?\.weight$")
    factors: Dict[str, Dict[str, torch.Tensor]] = {}
    for k, v in tensors.items():
        m = pat.match(k)
        if not m:
            raise FormatError(f"unexpected key {k!r} in {weights}")
        if not v.is_floating_point() or v.dim() != 2:
            raise FormatError(f"{weights}: {k} must be a 2-D float tensor, got {v.dim()}-D {v.dtype}")
        factors.setdefault(m.group(1), {})[m.group(2)] = v
    if not factors:
        raise FormatError(f"{weights} holds no LoRA factors")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA layers (merge_and_unload it first)")
    names = sorted(factors)
    layers = {n: m for n, m in model.named_modules() if _is_lora_target(m)}
    missing = [n for n in names if n not in layers]
    if missing:
        raise ValueError(f"the adapter targets modules this model lacks: {missing[:5]}")
    for n in names:
        a, b = factors[n].get("A"), factors[n].get("B")
        if a is None or b is None:
            raise FormatError(f"{weights}: module {n} lacks lora_{'A' if a is None else 'B'}")
        if a.shape[0] != r or b.shape[1] != r:
            raise FormatError(
                f"{weights}: module {n} has rank {a.shape[0]} (A {tuple(a.shape)}, B {tuple(b.shape)}) but "
                f"{ADAPTER_CONFIG} says r={r}"
            )
        n_in, n_out = _in_out(layers[n])
        if a.shape[1] != n_in or b.shape[0] != n_out:
            raise ValueError(
                f"adapter shapes for {n} (A {tuple(a.shape)}, B {tuple(b.shape)}) do not fit this model's layer "
                f"({n_in} inputs, {n_out} outputs: A ({r}, {n_in}), B ({n_out}, {r}))"
            )
    apply_lora(
        model,
        r=r,
        alpha=alpha,
        target_modules=[f"^{re.escape(n)}$" for n in names],
        dropout=float(cfg.get("lora_dropout", 0.0)),
    )
    with torch.no_grad():
        for n in names:
            layer = model.get_submodule(n)
            layer.lora_A.weight.copy_(factors[n]["A"])
            layer.lora_B.weight.copy_(factors[n]["B"])
    return names


# --------------------------------------------------------------------------- (IA)³

#: PEFT's default (IA)³ modules per model family (``TRANSFORMERS_MODELS_TO_IA3_*_MAPPING``):
#: (target modules, the feed-forward ones among them, whose input is scaled). A Llama scales its
#: keys, values and the input of ``down_proj``; GPT-2's fused ``c_attn`` scales queries too.
IA3_TARGETS: Dict[str, Tuple[Tuple[str, ...], Tuple[str, ...]]] = {
    "llama": (("k_proj", "v_proj", "down_proj"), ("down_proj",)),
    "gpt": (("c_attn", "mlp.c_proj"), ("mlp.c_proj",)),
}


def _family(model: nn.Module) -> Optional[str]:
    base = model.model if isinstance(model, PromptTuning) else model
    if isinstance(base, Llama) or type(base).__name__ in ("LlamaForCausalLM", "Qwen2ForCausalLM"):
        return "llama"
    if isinstance(base, GPT) or type(base).__name__ == "GPT2LMHeadModel":
        return "gpt"
    return None


def _patterns(value, what: str) -> List[str]:
    if isinstance(value, str):
        return [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{what} must be a list of module names, got {value!r}")
    return list(value)


def apply_ia3(
    model: nn.Module,
    target_modules: Optional[Sequence[str]] = None,
    feedforward_modules: Optional[Sequence[str]] = None,
) -> List[str]:
    """Wraps every linear layer whose name matches ``target_modules`` in an :class:`IA3Linear`
    (the ones also matching ``feedforward_modules`` scale their input); returns the wrapped names.
    Defaults: PEFT's for the model's family (:data:`IA3_TARGETS`; a Llama's ``k_proj``,
    ``v_proj`` and ``down_proj``, ``down_proj`` feed-forward); with ``target_modules`` given and
    ``feedforward_modules`` not, the family's feed-forward names among the targets. Patterns
    match as in :func:`apply_lora`.

    Raises:
        ValueError: no default for this model and no ``target_modules``, a pattern matching no
            linear layer (the message lists the layer names), ``feedforward_modules`` that are
            not among the targets, LoRA or (IA)³ already applied.

    Example:
        >>> from ferrolm.models import GPT, GPTConfig
        >>> model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16))
        >>> apply_ia3(model)[:2]
        ['transformer.h.0.attn.c_attn', 'transformer.h.0.mlp.c_proj']
        >>> prepare(model, "ia3"); trainable_parameters(model)[0]  # 2 x (48 + 64)
        224
    """
    family = _family(model)
    if target_modules is None:
        if family is None:
            raise ValueError(
                f"no default (IA)³ modules for a {type(model).__name__}; pass target_modules= and feedforward_modules="
            )
        target_modules = IA3_TARGETS[family][0]
    targets = _patterns(target_modules, "target_modules")
    if any(isinstance(m, IA3Linear) for m in model.modules()):
        raise ValueError("the model already has (IA)³ layers")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model has LoRA layers; LoRA and (IA)³ on one model are not supported")
    linears, chosen = _chosen_linears(model, targets)
    if feedforward_modules is None:  # the family's feed-forward names that match a target layer
        default_ff = IA3_TARGETS[family][1] if family else ()
        feedforward_modules = [p for p in default_ff if any(_matches(n, [p]) for n in chosen)]
    ff = _patterns(feedforward_modules, "feedforward_modules")
    loose = [n for n in linears if _matches(n, ff) and n not in chosen]
    if loose:
        raise ValueError(
            f"feedforward_modules {ff} match layers that are not targets ({loose[:3]}); "
            "feedforward_modules must be a subset of target_modules, as in PEFT's IA3Config"
        )
    for name in chosen:
        _set_module(model, name, IA3Linear(linears[name], feedforward=_matches(name, ff)))
    model.ia3_config = {"target_modules": targets, "feedforward_modules": ff}  # type: ignore[attr-defined]
    return chosen


def _ia3_layers(model: nn.Module) -> List[Tuple[str, IA3Linear]]:
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, IA3Linear)]
    if not layers:
        raise ValueError("the model has no (IA)³ layers (apply_ia3 first)")
    return layers


def _peft_matches(name: str, spec) -> bool:
    """PEFT's own rule: a string is a regex matched against the whole name, a list matches a
    name equal to an entry or ending with ``.`` + it."""
    if spec is None:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, name) is not None
    return any(name == p or name.endswith("." + p) for p in spec)


def _peft_spec(model: nn.Module, patterns: Sequence[str], chosen: Sequence[str]) -> List[str]:
    """``patterns`` when PEFT, reading them, selects exactly ``chosen`` among the model's linear
    layers; else the full names (which select exactly them)."""
    inner = {id(m.base) for m in model.modules() if isinstance(m, IA3Linear)}
    names = [
        n for n, m in model.named_modules() if isinstance(m, IA3Linear) or (_is_lora_target(m) and id(m) not in inner)
    ]
    if patterns and {n for n in names if _peft_matches(n, list(patterns))} == set(chosen):
        return sorted(patterns)
    return sorted(chosen)


def save_ia3(model: nn.Module, out_dir: PathLike) -> Path:
    """Writes the (IA)³ vectors in PEFT's ``IA3`` layout (atomically, file by file): keys
    ``base_model.model.<module>.ia3_l``, shaped (out, 1), or (1, in) for a feed-forward layer;
    ``peft.PeftModel.from_pretrained`` loads it on the matching transformers model. Returns
    ``out_dir``.

    Raises:
        ValueError: the model has no (IA)³ layers, or a layer is merged (its vector is in the weights).
    """
    layers = _ia3_layers(model)
    merged = [n for n, m in layers if m.merged]
    if merged:
        raise ValueError(f"(IA)³ layers {merged[:3]} are merged; unmerge them before saving the adapter")
    cfg = getattr(model, "ia3_config", None) or {}
    tensors = {}
    for name, m in layers:
        v = m.ia3_l.detach().cpu().contiguous()
        tensors[f"base_model.model.{name}.ia3_l"] = v[None, :] if m.feedforward else v[:, None]
    chosen = [n for n, _ in layers]
    ff = [n for n, m in layers if m.feedforward]
    targets = _peft_spec(model, cfg.get("target_modules", []), chosen)
    ff_spec = _peft_spec(model, cfg.get("feedforward_modules", []), ff)
    if not set(ff_spec) <= set(targets):  # PEFT's IA3Config wants the names themselves to be a subset
        targets, ff_spec = sorted(chosen), sorted(ff)
    config = {
        "peft_type": "IA3",
        "task_type": "CAUSAL_LM",
        "target_modules": targets,
        "feedforward_modules": ff_spec,
        "fan_in_fan_out": any(m.fan_in_fan_out for _, m in layers),
        "inference_mode": True,
        "init_ia3_weights": True,
        "base_model_name_or_path": None,
        "modules_to_save": None,
    }
    return _write_adapter(out_dir, tensors, config)


def _ia3_spec(cfg: Dict, key: str, path: Path, required: bool):
    v = cfg.get(key)
    if v is None and not required:
        return None
    if isinstance(v, str) and v:
        try:
            re.compile(v)
        except re.error as e:
            raise FormatError(f"{path}: {key!r} is not a valid regular expression ({e}): {v!r}") from None
        return v
    if isinstance(v, list) and v and all(isinstance(x, str) and x for x in v):
        return v
    if isinstance(v, list) and not v and not required:
        return None
    raise FormatError(f"{path}: {key!r} must be a regex string or a non-empty list of module names, got {v!r}")


def load_ia3(model: nn.Module, adapter_dir: PathLike) -> List[str]:
    """Applies an (IA)³ adapter saved by :func:`save_ia3` or by PEFT (``PeftModel.save_pretrained``
    of an ``IA3Config`` model) to ``model``; returns the adapted module names.

    The whole adapter (config, keys, each vector's shape against its layer and whether it is a
    feed-forward one, finite float values) is checked before the model is touched: a refused
    adapter leaves the model as it was.

    Raises:
        FileNotFoundError; FormatError (not an (IA)³ adapter, a malformed config, a corrupt or
        inconsistent weights file, naming the file and the key); ValueError (modules or shapes
        that do not fit this model, an adapter already applied).
    """
    d = _adapter_dir(adapter_dir)
    path = d / ADAPTER_CONFIG
    cfg = _peft_config(path, "IA3", "load_ia3")
    targets = _ia3_spec(cfg, "target_modules", path, required=True)
    ff_spec = _ia3_spec(cfg, "feedforward_modules", path, required=False)
    if cfg.get("modules_to_save"):
        raise ValueError(f"{path}: modules_to_save {cfg['modules_to_save']!r} is not supported (only (IA)³ vectors)")
    weights = d / ADAPTER_WEIGHTS
    pat = re.compile(r"^base_model\.model\.(.+)\.ia3_l(?:\.[^.]+)?$")
    vectors: Dict[str, torch.Tensor] = {}
    for k, v in _adapter_tensors(weights).items():
        m = pat.match(k)
        if not m:
            raise FormatError(f"unexpected key {k!r} in {weights}; an (IA)³ adapter holds '<module>.ia3_l' vectors")
        if not v.is_floating_point() or v.dim() != 2 or 1 not in v.shape:
            raise FormatError(
                f"{weights}: {k} must be a 2-D float tensor (out, 1) or (1, in), got {v.dtype} {tuple(v.shape)}"
            )
        if not bool(torch.isfinite(v).all()):
            raise FormatError(f"{weights}: {k} holds non-finite values")
        vectors[m.group(1)] = v
    if not vectors:
        raise FormatError(f"{weights} holds no (IA)³ vectors")
    if any(isinstance(m, (IA3Linear, LoRALinear)) for m in model.modules()):
        raise ValueError("the model already has LoRA or (IA)³ layers (merge_and_unload it first)")
    layers = {n: m for n, m in model.named_modules() if _is_lora_target(m)}
    names = sorted(vectors)
    missing = [n for n in names if n not in layers]
    if missing:
        raise ValueError(f"the adapter targets modules this model lacks: {missing[:5]}")
    untargeted = [n for n in names if not _peft_matches(n, targets)]
    if untargeted:
        raise FormatError(f"{weights} has vectors for {untargeted[:3]}, which target_modules {targets!r} do not name")
    ff = {n for n in names if _peft_matches(n, ff_spec)}
    for n in names:
        n_in, n_out = _in_out(layers[n])
        want = (1, n_in) if n in ff else (n_out, 1)
        if tuple(vectors[n].shape) != want:
            kind = "a feed-forward layer: (1, in_features)" if n in ff else "(out_features, 1)"
            raise ValueError(
                f"the (IA)³ vector for {n} has shape {tuple(vectors[n].shape)}; this model's layer "
                f"({n_in} inputs, {n_out} outputs) needs {want}, {kind}"
            )
    apply_ia3(
        model,
        target_modules=[f"^{re.escape(n)}$" for n in names],
        feedforward_modules=[f"^{re.escape(n)}$" for n in sorted(ff)],
    )
    with torch.no_grad():
        for n in names:
            layer = model.get_submodule(n)
            layer.ia3_l.copy_(vectors[n].flatten())
    model.ia3_config = {  # type: ignore[attr-defined]
        "target_modules": [targets] if isinstance(targets, str) else list(targets),
        "feedforward_modules": [ff_spec] if isinstance(ff_spec, str) else list(ff_spec or []),
    }
    return names
