"""Language-model recipes behind ``ferrolm train gpt|lstm``, ``ferrolm generate``,
``ferrolm finetune`` and ``ferrolm icl eval``: from files (or the embedded corpus and task) to a
tokenizer, a token stream or (prompt, target) pairs, a model, a training run and its files.

Every step the command line takes is a function here, so it can be called (and is tested)
from Python: :func:`token_stream`, :func:`train_language_model`, :func:`load_lm`,
:func:`finetune_data`, :func:`finetune_model`, :func:`icl_task`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .._io import PathLike, atomic_write, read_text
from ..corpus import default_corpus
from ..data import TokenShard, expand_paths, is_token_shard
from ..tokenizer import Tokenizer

__all__ = [
    "LMOptions",
    "token_stream",
    "train_language_model",
    "load_lm",
    "load_quantized",
    "stop_ids_of",
    "cut_at_stop_strings",
    "stream_tokens",
    "TextStream",
    "ChatCache",
    "chat",
    "finetune_data",
    "finetune_model",
    "icl_task",
]


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def token_stream(
    tok: Tokenizer, texts_or_files: Sequence[Union[str, Path]] = (), shards: Sequence[PathLike] = ()
) -> np.ndarray:
    """One int64 token stream: each text (or UTF-8 file) encoded and followed by
    ``<|endoftext|>`` when the tokenizer has it, then the tokens of each shard."""
    streams: List[np.ndarray] = []
    if texts_or_files:
        docs = [read_text(f) if isinstance(f, Path) else f for f in texts_or_files]
        eot = tok.special_tokens.get("<|endoftext|>")
        for ids in tok.encode_ordinary_batch(docs):
            streams.append(np.asarray(ids + ([eot] if eot is not None else []), dtype=np.int64))
    streams += [np.asarray(TokenShard(s).tokens, dtype=np.int64) for s in shards]
    if not streams:
        raise ValueError("no data: give texts, files or token shards")
    return np.concatenate(streams)


@dataclass
class LMOptions:
    """The sizes and training options of :func:`train_language_model` (the CLI's defaults)."""

    steps: int = 300
    batch_size: int = 16
    seq_len: int = 128
    grad_accum: int = 1
    lr: float = 1e-3
    warmup: int = 50
    vocab_size: int = 4096
    dropout: float = 0.0
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    positions: str = "learned"
    hidden_size: int = 512
    num_layers: int = 2
    cell: str = "lstm"
    val_fraction: float = 0.05
    eval_interval: int = 100
    eval_batches: int = 10
    checkpoint_interval: int = 100
    seed: int = 1337
    max_bytes: Optional[int] = None


def _check_options(arch: str, o: LMOptions) -> None:
    """Raises ValueError naming the first option that cannot run (before any work is done)."""
    from ..data import _check_int

    if arch not in ("gpt", "lstm"):
        raise ValueError(f"arch must be 'gpt' or 'lstm', got {arch!r}")
    for name in ("steps", "batch_size", "seq_len", "grad_accum", "vocab_size", "eval_batches"):
        _check_int(name, getattr(o, name))
    for name in ("warmup", "eval_interval", "checkpoint_interval"):
        _check_int(name, getattr(o, name), minimum=0)
    if arch == "gpt":
        for name in ("n_layer", "n_head", "n_embd"):
            _check_int(name, getattr(o, name))
    else:
        for name in ("n_embd", "hidden_size", "num_layers"):
            _check_int(name, getattr(o, name))
    _check_int("max_bytes", o.max_bytes, optional=True)
    if not (isinstance(o.val_fraction, (int, float)) and 0.0 <= o.val_fraction < 1.0):
        raise ValueError(f"val_fraction must be in [0, 1), got {o.val_fraction!r}")
    if not (isinstance(o.lr, (int, float)) and o.lr > 0 and o.lr < float("inf")):
        raise ValueError(f"lr must be a positive finite number, got {o.lr!r}")


def _lm_model(arch: str, o: LMOptions, vocab_size: int):
    """The GPT or LSTM of ``o`` (on the meta device when only its config is being checked)."""
    from ..models import GPT, GPTConfig, LSTMConfig, LSTMLanguageModel

    if arch == "gpt":
        return GPT(
            GPTConfig(
                vocab_size=vocab_size,
                block_size=o.seq_len,
                n_layer=o.n_layer,
                n_head=o.n_head,
                n_embd=o.n_embd,
                dropout=o.dropout,
                positions=o.positions,
            )
        )
    return LSTMLanguageModel(
        LSTMConfig(
            vocab_size=vocab_size,
            n_embd=o.n_embd,
            hidden_size=o.hidden_size,
            num_layers=o.num_layers,
            dropout=o.dropout,
            cell=o.cell,
            tie_weights=o.n_embd == o.hidden_size,
        )
    )


def _train_config(o: LMOptions):
    from ..training import TrainConfig

    return TrainConfig(
        max_steps=o.steps,
        batch_size=o.batch_size,
        seq_len=o.seq_len,
        grad_accum=o.grad_accum,
        lr=o.lr,
        min_lr=o.lr / 10,
        warmup_steps=min(o.warmup, o.steps // 10 + 1),
        eval_interval=o.eval_interval,
        eval_batches=o.eval_batches,
        checkpoint_interval=o.checkpoint_interval,
        seed=o.seed,
    )


def train_language_model(
    arch: str,
    data: Sequence[PathLike],
    out_dir: PathLike,
    options: Optional[LMOptions] = None,
    tokenizer: Optional[PathLike] = None,
    resume: bool = False,
):
    """Trains a GPT (``arch="gpt"``) or LSTM/GRU language model (``"lstm"``) and writes its
    checkpoint, ``model.safetensors`` and ``tokenizer.json`` into ``out_dir``.

    Every option, the model's config and the files are checked before any work, and nothing is
    written into ``out_dir`` until the run starts (a rejected run leaves the folder as it was);
    the folder is then locked for the run (:func:`ferrolm._io.folder_lock`).

    Args:
        data: UTF-8 text files, token shards or folders of them (empty: the embedded corpus).
        tokenizer: a tokenizer file; by default one is trained on the data (or, with
            ``resume``, the one already in ``out_dir`` is used).
        resume: continue the checkpoint in ``out_dir`` exactly.

    Returns:
        ``(model, TrainResult)``.

    Raises:
        ValueError naming the option; FileNotFoundError; FolderLockedError (another run
        writes into ``out_dir``).
    """
    import torch

    from ..models import GPT, LSTMLanguageModel, load_model
    from ..training import train
    from ..training.batches import batches_for
    from ..training.distributed import output_lock

    o = options or LMOptions()
    _check_options(arch, o)
    cfg = _train_config(o)
    with torch.device("meta"):  # the config's own checks (heads dividing the width, ...) at no cost
        _lm_model(arch, o, o.vocab_size)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file; pass a folder")
    if resume and not (out / "model.safetensors").is_file():
        raise FileNotFoundError(f"nothing to resume: {out / 'model.safetensors'} does not exist")
    files = expand_paths(data)
    shards = [f for f in files if is_token_shard(f)]
    texts_or_files: List[Any] = [f for f in files if f not in shards] if files else default_corpus(o.max_bytes)
    tok_path = Path(tokenizer) if tokenizer else out / "tokenizer.json"
    if resume and not tok_path.is_file():
        raise FileNotFoundError(f"nothing to resume with: {tok_path} does not exist (pass --tokenizer)")
    trained = False
    if tokenizer or resume:
        tok = Tokenizer.from_file(tok_path)
    elif shards and not texts_or_files:
        raise ValueError("token shards need the tokenizer that wrote them: pass --tokenizer")
    else:
        _log(f"training a {o.vocab_size}-token BPE tokenizer on the data ...")
        tok = Tokenizer.train(texts_or_files, vocab_size=o.vocab_size, special_tokens=["<|endoftext|>"])
        trained = True
    tokens = token_stream(tok, texts_or_files, shards)
    if len(tokens) and int(tokens.max()) >= tok.n_vocab:
        raise ValueError(
            f"the data holds token id {int(tokens.max())} but the tokenizer has {tok.n_vocab} tokens; "
            "pass the tokenizer that wrote the shards (--tokenizer)"
        )
    cut = int(len(tokens) * (1.0 - o.val_fraction))
    train_ids, val_ids = tokens[:cut], tokens[cut:]
    batches_for(train_ids, cfg, 0, 1)  # too little data for one batch is refused here, before any write
    model = (
        load_model(out / "model.safetensors", expect=GPT if arch == "gpt" else LSTMLanguageModel)
        if resume
        else _lm_model(arch, o, tok.n_vocab)
    )
    with output_lock(out):  # the run starts: from here on it writes into out
        _log(
            f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()):,} parameters; "
            f"{len(train_ids):,} training / {len(val_ids):,} validation tokens -> {out}"
        )
        if trained or not (out / "tokenizer.json").exists():
            tok.save_hf_json(out / "tokenizer.json")
        val = val_ids if len(val_ids) > cfg.batch_size * cfg.seq_len else None
        result = train(model, train_ids, val, cfg, out_dir=out, resume=resume)
    return model, result


def _is_hf_dir(path: Path) -> bool:
    import json

    try:
        return "model_type" in json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def _is_llama_dir(path: Path) -> bool:
    import json

    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return cfg.get("model_type") in ("llama", "qwen2")


def load_lm(
    path: PathLike,
    tokenizer: Optional[PathLike] = None,
    transformers_ok: bool = True,
    layers: Any = None,
    dequantize: bool = False,
) -> Tuple[Any, Tokenizer]:
    """``(model, tokenizer)`` by name or path.

    - ``"smollm2"``: the embedded SmolLM2-135M-Instruct (:func:`ferrolm.models.load`) and the
      tokenizer of the same GGUF file;
    - a ``.gguf`` file: :meth:`~ferrolm.models.Llama.from_gguf` and its own tokenizer;
    - a Hugging Face folder of a Llama/Qwen2 model: :meth:`~ferrolm.models.Llama.from_pretrained`;
    - a ferrolm checkpoint (a `ferrolm train` folder or a .safetensors file);
    - with ``transformers_ok``, any other local Hugging Face model folder (run by transformers).

    The tokenizer is ``tokenizer`` when given, else the model's own (the GGUF's, or the
    tokenizer.json beside the model). ``layers`` keeps only some layers of a Llama (tests).
    A GGUF model keeps its quantized matrices in blocks (:mod:`ferrolm.quant`) unless
    ``dequantize``.

    Raises:
        FileNotFoundError: no checkpoint or tokenizer there. ModuleNotFoundError: the embedded
            model's package is not installed (the message gives the pip command).
    """
    from ..models import Llama, load_model
    from ..models.llama import EMBEDDED_MODELS, embedded_path

    name = str(path)
    if name in EMBEDDED_MODELS or name.lower().endswith(".gguf"):
        gguf = embedded_path(name) if name in EMBEDDED_MODELS else Path(name)
        if not gguf.is_file():
            raise FileNotFoundError(f"no GGUF file at {gguf}")
        model = Llama.from_gguf(gguf, layers=layers, dequantize=dequantize)
        return model, Tokenizer.from_file(tokenizer) if tokenizer else Tokenizer.from_gguf(gguf)
    path = Path(path)
    if path.is_dir() and _is_llama_dir(path):
        model = Llama.from_pretrained(path, layers=layers)
        return model, Tokenizer.from_file(Path(tokenizer) if tokenizer else path / "tokenizer.json")
    if (
        transformers_ok and path.is_dir() and _is_hf_dir(path)
    ):  # ferrolm folders keep their config inside the checkpoint
        try:
            from transformers import AutoModelForCausalLM
        except ImportError as e:
            raise ImportError("a Hugging Face model folder needs transformers: pip install transformers") from e
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()
        return model, Tokenizer.from_file(Path(tokenizer) if tokenizer else path / "tokenizer.json")
    model_file = path / "model.safetensors" if path.is_dir() else path
    if not model_file.is_file():
        also = ", or a Hugging Face model folder" if transformers_ok else ""
        raise FileNotFoundError(
            f"no model checkpoint at {model_file}; pass {sorted(EMBEDDED_MODELS)[0]}, a .gguf file, "
            f"a folder written by `ferrolm train` or a .safetensors file{also}"
        )
    tok_file = Path(tokenizer) if tokenizer else (path if path.is_dir() else path.parent) / "tokenizer.json"
    return load_model(model_file), Tokenizer.from_file(tok_file)


def load_quantized(path: PathLike, layers: Any = None) -> Optional[Any]:
    """The Llama of ``path`` (``"smollm2"`` or a ``.gguf`` file) with its quantized matrices kept
    in blocks (:mod:`ferrolm.quant`), or None when ``path`` is another kind of model or the file
    stores no quantized matrix. Reads the model only: parsing the GGUF's tokenizer again took
    8 s of a 2-minute ``finetune experiment --quick``.

    Raises:
        FileNotFoundError: no GGUF file at ``path``.
    """
    from ..models import Llama
    from ..models.llama import EMBEDDED_MODELS, embedded_path
    from ..quant import QuantLinear

    name = str(path)
    if name not in EMBEDDED_MODELS and not name.lower().endswith(".gguf"):
        return None
    gguf = embedded_path(name) if name in EMBEDDED_MODELS else Path(name)
    if not gguf.is_file():
        raise FileNotFoundError(f"no GGUF file at {gguf}")
    model = Llama.from_gguf(gguf, layers=layers, dequantize=False)
    return model if any(isinstance(m, QuantLinear) for m in model.modules()) else None


def stop_ids_of(tok: Tokenizer) -> List[int]:
    """The ids that end a generation: the tokenizer's eos (a chat model's end of turn, e.g.
    SmolLM2's ``<|im_end|>``) and ``<|endoftext|>`` when it has them."""
    ids = [tok.eos_token_id, tok.special_tokens.get("<|endoftext|>")]
    return sorted({int(i) for i in ids if i is not None})


def cut_at_stop_strings(text: str, stop: Sequence[str]) -> Tuple[str, bool]:
    """``(text up to the first of the stop strings, whether one was found)``; the stop string
    itself is dropped."""
    cut = min((i for i in (text.find(s) for s in stop if s) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


def stream_tokens(
    model,
    ids: Sequence[int],
    max_new_tokens: int,
    temperature: Optional[float] = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    stop_ids: Sequence[int] = (),
    seed: Optional[int] = None,
    cache: Optional["ChatCache"] = None,
) -> Iterator[int]:
    """Yields the new tokens of one prompt as they are chosen, through the decoding protocol
    (:class:`ferrolm.decoding.Decoder`: one prefill, then one cached step per token); the same
    tokens as :func:`ferrolm.decoding.generate` with the same arguments. A stop id is yielded,
    then the stream ends.

    Args:
        ids: the prompt, a non-empty list of ids in [0, V).
        max_new_tokens: at most this many tokens (the prompt plus them must fit the window).
        cache: a :class:`ChatCache` kept across calls: the keys and values of the longest
            prefix this prompt shares with what the cache holds are reused, and only the rest
            of the prompt is prefilled (a chat's next turn starts with the whole conversation).
    """
    import torch

    from ..decoding import _step_logits, sample_next

    if not ids:
        raise ValueError("the prompt is empty")
    window = model.context_window
    if window is not None and len(ids) + max_new_tokens > window:
        max_new_tokens = window - len(ids)
        if max_new_tokens <= 0:
            raise ValueError(f"the prompt of {len(ids)} tokens fills the model's window of {window}")
    stops = {int(s) for s in stop_ids}
    gen = torch.Generator().manual_seed(int(seed)) if seed is not None else None
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if cache is None:
                state, kept = model.start(1, len(ids) + max_new_tokens), 0
            else:
                state, kept = cache._prepare(model, list(ids), len(ids) + max_new_tokens)
            rest = list(ids[kept:])
            idx = torch.tensor([rest], dtype=torch.long)
            logits = model.logits(model.advance(state, idx, torch.tensor([len(rest)]))[:, -1])
            if cache is not None:
                cache.ids = list(ids)
            for step in range(max_new_tokens):
                nxt = sample_next(logits, temperature, top_k, top_p, gen)  # (1,)
                t = int(nxt[0])
                yield t
                if t in stops or step == max_new_tokens - 1:
                    return
                logits = _step_logits(model, state, nxt.view(1, 1))  # generate's step (fused when quantized)
                if cache is not None:
                    cache.ids.append(t)
    finally:
        model.train(was_training)


class ChatCache:
    """The KV cache a chat keeps between its turns, and the ids whose keys and values it holds.

    Each turn renders the whole conversation again; :func:`stream_tokens` reuses the longest
    prefix the new prompt shares with :attr:`ids` and prefills only the rest (the new user
    message and whatever the template re-renders differently, such as a reply's re-encoded
    text). ``prefilled`` counts the prompt tokens actually run, turn by turn."""

    def __init__(self) -> None:
        self.ids: List[int] = []
        self.state: Any = None
        self.prefilled: List[int] = []

    def _prepare(self, model, ids: List[int], need: int):
        """(a state holding the reused prefix, its length); grows the caches when ``need``
        positions exceed their capacity (the prefix copied over)."""
        import torch

        kept = 0
        for a, b in zip(self.ids, ids):
            if a != b:
                break
            kept += 1
        kept = min(kept, len(ids) - 1)  # at least one prompt token runs: it gives the logits
        # only a KV cache can be cut back to the shared prefix; a recurrent state is made anew
        old = self.state if _is_kv(self.state) else None
        if old is None or old[0].capacity < need:
            window = model.context_window
            capacity = 2 * need if window is None else min(window, 2 * need)  # room for the next turns
            self.state = model.start(1, capacity)
            if old is not None and kept > 0:
                for a, b in zip(self.state, old):
                    a.k[:, :, :kept] = b.k[:, :, :kept]
                    a.v[:, :, :kept] = b.v[:, :, :kept]
            else:
                kept = 0
        if _is_kv(self.state):
            for c in self.state:
                c.lengths = torch.full_like(c.lengths, kept)
        self.ids = ids[:kept]  # what the state holds now, even if the prefill that follows fails
        self.prefilled.append(len(ids) - kept)
        return self.state, kept


def _is_kv(state) -> bool:
    from ..nn.attention import KVCache

    return isinstance(state, list) and bool(state) and all(isinstance(c, KVCache) for c in state)


class TextStream:
    """Turns tokens into text as they come: :meth:`push` returns the newly complete UTF-8 text
    (a character split over tokens waits for its last byte)."""

    def __init__(self, tok: Tokenizer) -> None:
        import codecs

        self.tok = tok
        self._dec = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        return self._dec.decode(self.tok.decode_bytes([token]))

    def flush(self) -> str:
        return self._dec.decode(b"", final=True)


def chat(
    model,
    tok: Tokenizer,
    lines: Iterable[str],
    write: Callable[[str], None],
    max_new_tokens: int = 256,
    temperature: Optional[float] = 0.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: Optional[int] = None,
    system: Optional[str] = None,
    keep_cache: bool = True,
) -> List[Dict[str, str]]:
    """An interactive chat: each line of ``lines`` is a user turn; the conversation so far is
    rendered with the tokenizer's chat template, the reply streams to ``write`` token by token
    and ends at the end-of-turn token (eos) or after ``max_new_tokens``; the oldest exchanges
    are dropped when the conversation outgrows the model's window. With ``keep_cache`` the
    keys and values of the conversation so far are kept between turns (:class:`ChatCache`), so a
    turn prefills only its new tokens. Returns the messages.

    Raises:
        ValueError: the tokenizer has no chat template.
    """
    if not tok.chat_template:
        raise ValueError("this tokenizer has no chat template; `ferrolm chat` needs a chat model (e.g. smollm2)")
    messages: List[Dict[str, str]] = [{"role": "system", "content": system}] if system else []
    stops = stop_ids_of(tok)
    first, window = len(messages), model.context_window
    cache = ChatCache() if keep_cache else None
    for line in lines:
        text = line.rstrip("\n")
        if not text.strip():
            continue
        messages.append({"role": "user", "content": text})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True)
        while window is not None and len(ids) >= window and len(messages) > first + 1:
            del messages[first : first + 2]  # the oldest exchange leaves when the window is full
            ids = tok.apply_chat_template(messages, add_generation_prompt=True)
        stream, reply = TextStream(tok), []
        for t in stream_tokens(model, ids, max_new_tokens, temperature, top_k, top_p, stops, seed, cache):
            if t in stops:
                break
            piece = stream.push(t)
            reply.append(piece)
            write(piece)
        tail = stream.flush()
        write(tail + "\n")
        messages.append({"role": "assistant", "content": "".join(reply) + tail})
    return messages


def finetune_data(
    tok: Tokenizer, data: Optional[PathLike] = None, input_key: str = "input", output_key: Optional[str] = None
):
    """Fine-tuning data: ``[(prompt ids, target ids), ...]`` for examples with outputs (the loss
    then falls on the targets only), else one int64 token stream of the texts.

    Args:
        data: a JSONL/CSV file of examples (with outputs: pairs; inputs alone: texts), a text
            file, or None for the embedded task rendered as (prompt, label word) pairs.
    """
    from ..icl import Example, load_examples
    from ..icl.tasks import stdlib_package_task

    if data is None:
        pool, _, template = stdlib_package_task()
        prompts = [template.render([], Example(e.input, None, e.fields)) for e in pool]
        pairs = list(
            zip(
                tok.encode_ordinary_batch(prompts),
                tok.encode_ordinary_batch([template.label_words[e.output] for e in pool]),
            )
        )  # type: ignore[index]
        _log(f"embedded task: {len(pairs)} (prompt, label word) pairs")
        return pairs
    path = Path(data)
    if path.suffix.lower() in (".jsonl", ".csv"):
        examples = load_examples(path, input_key, output_key)
        if all(e.output is not None for e in examples):
            return list(
                zip(
                    tok.encode_ordinary_batch([e.input for e in examples]),
                    tok.encode_ordinary_batch([str(e.output) for e in examples]),
                )
            )
        texts = [e.input for e in examples]
    else:
        texts = [read_text(path)]
    eot = tok.special_tokens.get("<|endoftext|>")
    return np.asarray(
        [t for ids in tok.encode_ordinary_batch(texts) for t in ids + ([eot] if eot is not None else [])],
        dtype=np.int64,
    )


#: Default LoRA target modules by model family (a Llama's are transformers' names, as PEFT's).
LORA_TARGETS: Dict[str, Tuple[str, ...]] = {
    "gpt": ("c_attn", "c_proj", "c_fc"),
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
}


def finetune_model(
    model,
    tok: Tokenizer,
    method: str,
    data,
    out_dir: PathLike,
    steps: int = 200,
    batch_size: int = 8,
    seq_len: int = 128,
    lr: float = 1e-3,
    r: int = 8,
    alpha: float = 16.0,
    lora_dropout: float = 0.0,
    targets: Optional[Sequence[str]] = None,
    virtual_tokens: int = 16,
    checkpoint_interval: int = 100,
    seed: int = 1337,
    resume: bool = False,
):
    """Fine-tunes a ferrolm GPT, Llama or LSTM language model with ``method`` (lora, ia3, bitfit,
    prompt, head, full; prompt tuning and (IA)³ on a GPT or Llama) on ``data`` (from
    :func:`finetune_data`) and writes into ``out_dir``: ``model.safetensors`` (LoRA / (IA)³
    merged), ``adapter/`` in PEFT's layout (LoRA or (IA)³ on a GPT or Llama),
    ``prompt.safetensors`` (prompt tuning) and ``tokenizer.json``. LoRA or (IA)³ on a quantized
    base (:mod:`ferrolm.quant`) writes the adapter only: the base stays the file it came from.
    ``targets`` defaults to :data:`LORA_TARGETS` of the model's family for LoRA and to PEFT's
    (IA)³ modules (:data:`ferrolm.finetune.IA3_TARGETS`) for ia3. Returns the TrainResult.
    """
    from safetensors.torch import save

    from .. import finetune as ft
    from ..models import GPT, Llama, LSTMLanguageModel, save_model
    from ..quant import QuantLinear
    from ..training import TrainConfig, train
    from ..training.distributed import output_lock

    if not isinstance(model, (GPT, Llama, LSTMLanguageModel)):
        raise ValueError(
            "ferrolm finetune takes a ferrolm GPT, Llama or LSTM model (use PEFT for other Hugging Face models)"
        )
    if method in ("prompt", "ia3") and not isinstance(model, (GPT, Llama)):
        raise ValueError(f"method {method!r} takes a ferrolm GPT or Llama, not a {type(model).__name__}")
    if targets is None and method != "ia3":
        targets = LORA_TARGETS["llama" if isinstance(model, Llama) else "gpt"]
    target: Any = model
    if method == "ia3":
        ft.apply_ia3(model, target_modules=list(targets) if targets else None)
    elif method == "lora":
        if isinstance(model, (GPT, Llama)):
            ft.apply_lora(model, r=r, alpha=alpha, target_modules=list(targets), dropout=lora_dropout)
        else:
            ft.apply_lora_rnn(model.rnn, r=r, alpha=alpha)
    elif method == "prompt":
        target = ft.PromptTuning(model, virtual_tokens)
    ft.prepare(target, method)
    if ft.trainable_parameters(target)[0] == 0:
        raise ValueError(
            f"method {method!r} leaves nothing to train in this {type(model).__name__} (it has no biases); "
            "pick lora, head or full"
        )
    ft.print_trainable_parameters(target)
    block = getattr(model.config, "block_size", None)
    if block:
        seq_len = min(seq_len, block - (virtual_tokens if method == "prompt" else 0))
    cfg = TrainConfig(
        max_steps=steps,
        batch_size=batch_size,
        seq_len=seq_len,
        lr=lr,
        min_lr=lr / 10,
        warmup_steps=min(20, steps // 10),
        eval_interval=0,
        checkpoint_interval=checkpoint_interval,
        seed=seed,
    )
    out = Path(out_dir)
    quantized = any(isinstance(m, QuantLinear) for m in model.modules())
    with output_lock(out):  # the run and the files written after it, as one locked unit
        result = train(target, data, None, cfg, out_dir=out, resume=resume)
        save_adapter = ft.save_ia3 if method == "ia3" else ft.save_lora
        if method in ("lora", "ia3") and quantized:
            # QLoRA / (IA)³ on quantized blocks: the adapter is the result; merging would requantize the base.
            save_adapter(model, out / "adapter")
        elif method in ("lora", "ia3") and isinstance(model, (GPT, Llama)):
            save_adapter(model, out / "adapter")
            ft.merge_and_unload(model)
        elif method == "lora":
            ft.merge_lora_rnn(model.rnn)
        if quantized and method in ("lora", "ia3"):
            pass
        elif method == "prompt":
            atomic_write(out / "prompt.safetensors", save({"prompt": target.prompt.detach().cpu().contiguous()}))
        else:
            save_model(model, out / "model.safetensors")
        tok.save_hf_json(out / "tokenizer.json")
    return result


def _unescape(x: str) -> str:
    """Shells pass "\\n" literally: ``\\n`` and ``\\t`` become newline and tab."""
    return x.replace("\\n", "\n").replace("\\t", "\t")


def icl_task(
    data: Optional[PathLike] = None,
    input_key: str = "input",
    output_key: Optional[str] = None,
    demo: str = "{input}\nAnswer:{label}",
    query: str = "{input}\nAnswer:",
    separator: str = "\n\n",
    instruction: str = "",
    label_words: Optional[Dict[str, str]] = None,
    test_fraction: float = 0.2,
):
    """``(pool, test, template)`` of a k-shot classification task: the examples of ``data``
    (JSONL/CSV; the tail ``test_fraction`` are the queries, label words default to
    ``" " + label``; ``\\n``/``\\t`` in the templates unescaped), or the embedded task."""
    from ..icl import Template, load_examples
    from ..icl.tasks import stdlib_package_task

    if data is None:
        pool, test, template = stdlib_package_task()
        _log(
            f"embedded task: standard-library package of a code snippet ({len(template.choices())} classes, "
            f"{len(pool)} pool / {len(test)} test examples)"
        )
        return pool, test, template
    examples = load_examples(data, input_key=input_key, output_key=output_key)
    words = label_words or {lab: " " + lab for lab in sorted({str(e.output) for e in examples})}
    examples = [type(e)(e.input, str(e.output), e.fields) for e in examples]
    template = Template(
        demo=_unescape(demo),
        query=_unescape(query),
        separator=_unescape(separator),
        instruction=_unescape(instruction),
        label_words=words,
    )
    if not examples:
        raise ValueError(f"{data} holds no examples")
    unlabelled = sorted({e.output for e in examples} - set(words))
    if unlabelled:
        raise ValueError(f"the labels {unlabelled[:5]} of {data} have no label word; label_words has {sorted(words)}")
    for which in ("demo", "query"):  # a misspelt field is refused now, not after the first evaluations
        known = examples[0].values()
        unknown = [f for f in template.fields(which) if f not in known]
        if unknown:
            raise ValueError(
                f"the {which} template refers to {{{unknown[0]}}}, which the examples of {data} lack "
                f"(fields: {sorted(known)})"
            )
    n_test = max(1, int(len(examples) * test_fraction))
    return examples[:-n_test], examples[-n_test:], template
