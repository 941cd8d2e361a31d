"""Quantized inference: linear layers and embeddings whose weights stay in GGUF's block formats.

A :class:`QuantLinear` holds its weight as the raw bytes of llama.cpp's blocks (a uint8 buffer of
shape ``(out_features, row_bytes)``: Q8_0, Q4_0, Q4_1, Q4_K or Q6_K, byte for byte what a GGUF
file stores) and multiplies through ferrolm's Rust kernels: the input rows are quantized to
8-bit groups of 32 and every weight row is an integer dot product (AVX-512 VNNI or AVX2, chosen
at run time, a scalar path elsewhere), on ``torch.get_num_threads()`` threads. The gradient
with respect to the input flows through the layer (the weight is dequantized one layer at a
time for it), so adapters such as LoRA train on a frozen quantized base; the blocks themselves
are frozen. :class:`QuantEmbedding` looks rows up in a quantized table (GGUF's token
embeddings), and can share its blocks with a tied output head.

:func:`quantize` replaces the linear layers of any model (GPT, Llama, ...) in place;
:meth:`ferrolm.models.Llama.from_gguf` keeps a file's quantized tensors as they are.

Example:
    >>> import torch
    >>> from ferrolm.quant import QuantLinear
    >>> lin = torch.nn.Linear(64, 8)
    >>> q = QuantLinear.from_linear(lin, "q8_0")
    >>> x = torch.randn(3, 64)
    >>> bool(torch.allclose(q(x), lin(x), atol=0.05))
    True
"""

from __future__ import annotations

from typing import Iterable, Optional, Tuple

import numpy as np
import torch
from torch import nn

from . import _core
from ._io import PathLike
from .kernels._common import num_threads

__all__ = [
    "QTYPES",
    "DENSE_ROWS",
    "DENSE_ROWS_PACKED",
    "PACKED",
    "QuantLinear",
    "QuantEmbedding",
    "quantize",
    "dequantize",
    "row_bytes",
    "kernel_paths",
    "save_gguf",
]

#: The block types the kernels run, by their GGUF names.
QTYPES: Tuple[str, ...] = ("Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
#: (values per block, bytes per block)
_BLOCKS = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q4_K": (256, 144), "Q6_K": (256, 210)}


def _qtype(qtype: str) -> str:
    if not isinstance(qtype, str) or qtype.upper() not in _BLOCKS:
        raise ValueError(f"unknown block type {qtype!r}; expected one of {', '.join(QTYPES)} (any case)")
    return qtype.upper()


def row_bytes(qtype: str, k: int, name: str = "weight") -> int:
    """Bytes of a row of ``k`` values in ``qtype`` blocks; ValueError naming ``name`` when
    ``k`` is not a whole number of blocks."""
    qt = _qtype(qtype)
    values, size = _BLOCKS[qt]
    if k <= 0 or k % values:
        raise ValueError(f"{name}: rows of {k} values cannot be stored as {qt} (blocks of {values} values)")
    return k // values * size


def kernel_paths() -> Tuple[str, Tuple[str, ...]]:
    """(the path the kernels take here, every path this CPU can run): ``avx512vnni``,
    ``avx2`` or ``scalar``; the environment variable ``FERROLM_QUANT_ISA`` lowers the choice."""
    best, all_ = _core.quant_isa()
    return best, tuple(all_)


def _check_blocks(blocks: torch.Tensor, n: int, k: int, qtype: str, name: str) -> torch.Tensor:
    if not isinstance(blocks, torch.Tensor) or blocks.dtype != torch.uint8:
        raise TypeError(f"{name}: blocks must be a uint8 tensor, got {getattr(blocks, 'dtype', type(blocks).__name__)}")
    want = (n, row_bytes(qtype, k, name))
    if blocks.numel() != want[0] * want[1]:
        raise ValueError(
            f"{name}: {qtype} weights of shape ({n}, {k}) take {want[0] * want[1]} bytes "
            f"({n} rows of {want[1]}), got {blocks.numel()}"
        )
    return blocks.reshape(want)


def dequantize(blocks: torch.Tensor, n: int, k: int, qtype: str) -> torch.Tensor:
    """The float32 (n, k) matrix that ``blocks`` encode."""
    qt = _qtype(qtype)
    blocks = _check_blocks(blocks, n, k, qt, "weight")
    a = _core.quant_dequantize(blocks.detach().cpu().contiguous().numpy(), n, k, qt, num_threads())
    return torch.from_numpy(a)


def _quantize_tensor(w: torch.Tensor, qtype: str, name: str) -> torch.Tensor:
    qt = _qtype(qtype)
    if w.dim() != 2:
        raise ValueError(f"{name}: only 2-D weights can be quantized, got shape {tuple(w.shape)}")
    row_bytes(qt, w.shape[1], name)
    x = w.detach().to("cpu", torch.float32).contiguous().numpy()
    if not np.isfinite(x).all():
        raise ValueError(f"{name}: the weight has NaN or infinite values; blocks cannot hold them")
    return torch.from_numpy(_core.quant_quantize(x, qt))


#: From this many input rows on, a product dequantizes the layer's weight (transiently) and runs torch's float32
#: GEMM: prompt processing and scoring are bound by arithmetic, where oneDNN's float kernels outrun the integer dot
#: products; below it (decoding) the integer kernels stream the blocks. Set it to a large number to keep every product
#: on the integer kernels.
DENSE_ROWS = 16

#: Q8_0/Q4_0/Q4_1 layers with a multiple of 16 output rows keep a second copy of their blocks interleaved by 16 rows
#: (``_core.QuantPacked``, built on first use, the same number of bytes), which the integer kernels read several
#: times faster than GGUF's row-major blocks. Set to False to keep only the file's blocks.
PACKED = True

#: The same threshold for layers with an interleaved copy, whose integer kernels unpack each block column once for
#: four input rows: measured on SmolLM2 (2 threads, AVX-512 VNNI) against the dequantize + float32 GEMM path, prefill
#: of 36 tokens 161 vs 261 ms, 196 tokens 422 vs 517 ms, 512 tokens 1229 vs 1085 ms.
DENSE_ROWS_PACKED = 256


class _QuantMatmul(torch.autograd.Function):
    """y = x Wᵀ with W in blocks; the input gradient dequantizes W (one layer, transiently)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, blocks: torch.Tensor, n: int, k: int, qtype: str, packed=None) -> torch.Tensor:
        ctx.meta = (blocks, n, k, qtype)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, k)
        if x2.dtype != torch.float32:
            x2 = x2.float()
        if packed is None and x2.shape[0] >= DENSE_ROWS:
            y = x2.detach() @ dequantize(blocks, n, k, qtype).t()
            return y.to(x.dtype).reshape(*lead, n)
        xs = x2.detach().contiguous().numpy()
        if packed is not None:
            y = packed.matmul(xs, num_threads())
        else:
            y = _core.quant_matmul(xs, blocks.numpy(), n, k, qtype, num_threads())
        return torch.from_numpy(y).to(x.dtype).reshape(*lead, n)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        blocks, n, k, qtype = ctx.meta
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        w = dequantize(blocks, n, k, qtype)
        gx = gy.reshape(-1, n).float() @ w
        return gx.to(gy.dtype).reshape(*gy.shape[:-1], k), None, None, None, None, None


class QuantLinear(nn.Module):
    """``nn.Linear`` with a block-quantized, frozen weight: ``y = x Wᵀ + b``.

    Args:
        in_features, out_features: as ``nn.Linear``; ``in_features`` a multiple of the block
            size (32, or 256 for the K-quants).
        qtype: ``"q8_0"``, ``"q4_0"``, ``"q4_1"``, ``"q4_k"`` or ``"q6_k"`` (any case).
        bias: add a float32 bias (trainable).
        blocks: the weight's bytes, (out_features, row_bytes) uint8, as a GGUF file stores them
            (zeros, i.e. a zero weight, when omitted).

    The blocks live in the buffer ``qweight`` (saved in ``state_dict``); ``qtype`` is a plain
    attribute. Float32 inputs run the Rust kernels; other float dtypes are computed in float32
    and cast back; CUDA inputs dequantize the weight on their device and use ``F.linear``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        qtype: str,
        bias: bool = True,
        blocks: Optional[torch.Tensor] = None,
    ) -> None:
        super().__init__()
        self.qtype = _qtype(qtype)
        self.in_features, self.out_features = int(in_features), int(out_features)
        rb = row_bytes(self.qtype, self.in_features)
        if blocks is None:
            blocks = torch.from_numpy(
                _core.quant_quantize(np.zeros((self.out_features, self.in_features), np.float32), self.qtype)
            )
        blocks = _check_blocks(blocks, self.out_features, self.in_features, self.qtype, "blocks")
        self.register_buffer("qweight", blocks.contiguous())
        assert self.qweight.shape[1] == rb
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None

    @classmethod
    def from_linear(cls, linear: nn.Linear, qtype: str, name: str = "linear") -> "QuantLinear":
        """``linear``'s weight quantized to ``qtype`` (its bias kept in float32)."""
        q = cls(
            linear.in_features,
            linear.out_features,
            qtype,
            bias=linear.bias is not None,
            blocks=_quantize_tensor(linear.weight, qtype, name),
        )
        if linear.bias is not None:
            q.bias.data.copy_(linear.bias.detach().float())
        return q

    def weight_numel(self) -> int:
        """Values in the weight (out_features x in_features)."""
        return self.in_features * self.out_features

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 (out_features, in_features) weight the blocks encode."""
        return dequantize(self.qweight, self.out_features, self.in_features, self.qtype)

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight (float32, a fresh tensor: changing it changes nothing)."""
        return self.dequantized_weight()

    def packed(self):
        """The blocks interleaved by 16 rows (a ``_core.QuantPacked``), built on first use and
        again whenever ``qweight`` changes; None when :data:`PACKED` is off or the layer's type
        or row count has no interleaved kernels."""
        if (
            not PACKED
            or self.qweight.device.type != "cpu"
            or not _core.QuantPacked.supports(self.qtype, self.out_features)
        ):
            return None
        key = (self.qweight.data_ptr(), self.qweight._version)
        if self.__dict__.get("_packed_key") != key:
            self.__dict__["_packed"] = _core.QuantPacked(
                self.qweight.numpy(), self.out_features, self.in_features, self.qtype
            )
            self.__dict__["_packed_key"] = key
        return self.__dict__["_packed"]

    def __getstate__(self):
        # The packed copy is rebuilt on first use (it cannot be pickled or deep-copied).
        state = self.__dict__.copy()
        state.pop("_packed", None)
        state.pop("_packed_key", None)
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input (..., {self.in_features}), got {tuple(x.shape)}")
        if x.device.type != "cpu":
            w = self.dequantized_weight().to(x.device, x.dtype)
            return nn.functional.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        if not x.dtype.is_floating_point:
            raise TypeError(f"QuantLinear needs a floating-point input, got {x.dtype}")
        rows = x.numel() // self.in_features
        packed = self.packed() if rows < max(DENSE_ROWS_PACKED, DENSE_ROWS) else None
        y = _QuantMatmul.apply(x, self.qweight, self.out_features, self.in_features, self.qtype, packed)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype}, "
            f"bias={self.bias is not None}"
        )


class QuantEmbedding(nn.Module):
    """``nn.Embedding`` over a block-quantized table (GGUF's ``token_embd``): rows are
    dequantized on lookup. Frozen (no gradient reaches the table)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, qtype: str, blocks: Optional[torch.Tensor] = None):
        super().__init__()
        self.qtype = _qtype(qtype)
        self.num_embeddings, self.embedding_dim = int(num_embeddings), int(embedding_dim)
        row_bytes(self.qtype, self.embedding_dim, "embedding")
        if blocks is None:
            blocks = torch.from_numpy(
                _core.quant_quantize(np.zeros((self.num_embeddings, self.embedding_dim), np.float32), self.qtype)
            )
        blocks = _check_blocks(blocks, self.num_embeddings, self.embedding_dim, self.qtype, "embedding")
        self.register_buffer("qweight", blocks.contiguous())

    @classmethod
    def from_embedding(cls, emb: nn.Embedding, qtype: str, name: str = "embedding") -> "QuantEmbedding":
        return cls(emb.num_embeddings, emb.embedding_dim, qtype, _quantize_tensor(emb.weight, qtype, name))

    def weight_numel(self) -> int:
        return self.num_embeddings * self.embedding_dim

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized table (float32, a fresh tensor)."""
        return dequantize(self.qweight, self.num_embeddings, self.embedding_dim, self.qtype)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
            raise TypeError(f"embedding ids must be an integer tensor, got {ids.dtype}")
        flat = ids.reshape(-1).to("cpu", torch.int64).contiguous().numpy()
        rows = _core.quant_gather(self.qweight.numpy(), self.num_embeddings, self.embedding_dim, self.qtype, flat)
        return torch.from_numpy(rows).reshape(*ids.shape, self.embedding_dim).to(ids.device)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, qtype={self.qtype}"


def _modules_to_quantize(model: nn.Module, include: Optional[Iterable[str]], exclude: Iterable[str]):
    exclude = tuple(exclude)
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear):
            continue
        if include is not None and not any(name == p or name.startswith(p + ".") or p in name for p in include):
            continue
        if any(name == p or name.startswith(p + ".") for p in exclude):
            continue
        yield name, mod


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def quantize(
    model: nn.Module,
    qtype: str = "q8_0",
    *,
    head: Optional[str] = "q8_0",
    head_name: str = "lm_head",
    include: Optional[Iterable[str]] = None,
    exclude: Iterable[str] = (),
) -> nn.Module:
    """Replaces ``model``'s ``nn.Linear`` layers by :class:`QuantLinear` in ``qtype``, in place,
    and returns the model.

    Args:
        qtype: the block type of the linear layers (``q8_0``, ``q4_0``, ``q4_1``, ``q4_k``, ``q6_k``).
        head: the block type of the output layer ``head_name`` (``None`` keeps it float); when
            the model ties it to its token embedding (``lm_head.weight is
            model.embed_tokens.weight`` or GPT's ``wte``), the embedding becomes a
            :class:`QuantEmbedding` sharing the head's blocks, as in GGUF files.
        include: names (or name parts) of the only layers to quantize.
        exclude: layer names (and their children) to leave in float.

    Raises:
        ValueError: a layer whose input width is not a multiple of the block size (named), or
            whose weight holds NaN/inf. Nothing is replaced unless every layer can be.
    """
    qtype = _qtype(qtype)
    head = None if head is None else _qtype(head)
    todo = []
    for name, mod in _modules_to_quantize(model, include, exclude):
        is_head = name == head_name
        if is_head and head is None:
            continue
        t = head if is_head else qtype
        row_bytes(t, mod.in_features, f"{name} ({t})")
        todo.append((name, mod, t))
    tied = None
    if head is not None:
        hmod = dict(model.named_modules()).get(head_name)
        for ename, emod in model.named_modules():
            if isinstance(emod, nn.Embedding) and hmod is not None and getattr(hmod, "weight", None) is emod.weight:
                tied = ename
    new = {name: QuantLinear.from_linear(mod, t, name) for name, mod, t in todo}
    for name, q in new.items():
        _set(model, name, q)
    if tied is not None and head_name in new:
        emb = dict(model.named_modules())[tied]
        _set(
            model,
            tied,
            QuantEmbedding(emb.num_embeddings, emb.embedding_dim, head, blocks=new[head_name].qweight),
        )
    return model


def save_gguf(model: nn.Module, path: PathLike) -> None:
    """Writes a (quantized) Llama-family model as a GGUF file, its blocks byte for byte; see
    :meth:`ferrolm.models.Llama.save_gguf`.

    Raises:
        TypeError: ``model`` is not a :class:`ferrolm.models.Llama` (GGUF's ``llama``/``qwen2``
            architectures are the ones ferrolm writes).
    """
    # Duck-typed: importing models.llama here would close an import circle (llama -> common -> checkpoint -> quant).
    save = getattr(model, "save_gguf", None)
    if not callable(save):
        raise TypeError(
            f"save_gguf writes Llama-family models (ferrolm.models.Llama), got {type(model).__name__}; "
            "save other models with model.save(path) (safetensors, blocks kept)"
        )
    save(path)
