"""Byte-level BPE tokenizer with a Rust engine.

``ferrolm.Tokenizer`` trains, encodes and decodes byte-level BPE, reads and writes HF
``tokenizer.json``, tiktoken rank files and the vocabulary inside GGUF model files, gives the
same ids as HF tokenizers, tiktoken and llama.cpp on the same vocabulary, and renders chat
templates as transformers does. Its tiktoken-compatible surface (``encode``,
``encode_ordinary``, ``encode_batch``, ``decode_bytes``, ``n_vocab`` ...) makes switching a
one-line change. Nothing is ever downloaded.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import (
    AbstractSet,
    Any,
    Collection,
    Dict,
    Iterable,
    List,
    Literal,
    Optional,
    Sequence,
    Tuple,
    Union,
)

import numpy as np

from . import _core
from ._io import PathLike, atomic_write
from .errors import FormatError, UnknownTokenError

__all__ = ["Tokenizer", "GPT2_PATTERN", "CL100K_PATTERN", "PATTERNS"]

#: tiktoken's GPT-2 (``r50k_base``) pre-tokenizer pattern: the default.
GPT2_PATTERN: str = _core.GPT2_PATTERN
#: tiktoken's ``cl100k_base`` pre-tokenizer pattern.
CL100K_PATTERN: str = _core.CL100K_PATTERN
#: Named patterns accepted wherever a ``pattern`` argument is.
PATTERNS: Dict[str, str] = {
    "gpt2": GPT2_PATTERN,
    "r50k_base": GPT2_PATTERN,
    "p50k_base": GPT2_PATTERN,
    "cl100k_base": CL100K_PATTERN,
    "cl100k": CL100K_PATTERN,
}

_EMPTY: AbstractSet[str] = frozenset()
SpecialSet = Union[Literal["all"], AbstractSet[str]]


def _resolve_pattern(pattern: Optional[str]) -> str:
    if pattern is None:
        return GPT2_PATTERN
    if not isinstance(pattern, str):
        raise TypeError(f"pattern must be a str (a regex or one of {sorted(PATTERNS)}), got {type(pattern).__name__}")
    return PATTERNS.get(pattern, pattern)


def _bytelevel_tables() -> Tuple[List[str], Dict[str, int]]:
    printable = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    table = [""] * 256
    n = 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + n)
            n += 1
    return table, {c: b for b, c in enumerate(table)}


_BYTE_TO_CHAR, _CHAR_TO_BYTE = _bytelevel_tables()


def _check_str(text: object, what: str = "text") -> None:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}; decode bytes first (bytes.decode('utf-8'))")


def _threads(num_threads: object) -> Optional[int]:
    """``num_threads`` checked: None or an int >= 0 (0 and None: all cores); the error names it."""
    if num_threads is None:
        return None
    if isinstance(num_threads, bool) or not isinstance(num_threads, int):
        raise TypeError(f"num_threads must be an int or None, got {type(num_threads).__name__}")
    if num_threads < 0:
        raise ValueError(f"num_threads must be >= 0 (0 or None: all cores), got {num_threads}")
    return min(num_threads, 1 << 16)  # the native side caps it at the core count


def _as_id_list(ids: object) -> List[int]:
    if isinstance(ids, list):
        return ids
    if hasattr(ids, "tolist"):  # numpy arrays, torch tensors
        out = ids.tolist()  # type: ignore[union-attr]
        if isinstance(out, int):
            return [out]
        return out
    try:
        return list(ids)  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(f"ids must be a sequence of ints, got {type(ids).__name__}") from None


class Tokenizer:
    """A byte-level BPE tokenizer.

    Build one with :meth:`train`, :meth:`from_hf_json`, :meth:`from_tiktoken` or
    :meth:`from_ranks`; users never construct it from the native object directly.

    Example:
        >>> from ferrolm import Tokenizer
        >>> tok = Tokenizer.train(["hello world, hello tokenizer"] * 10, vocab_size=300)
        >>> ids = tok.encode("hello world")
        >>> tok.decode(ids)
        'hello world'
    """

    def __init__(self, core: "_core.CoreTokenizer", meta: Optional[Dict[str, Any]] = None) -> None:
        if not isinstance(core, _core.CoreTokenizer):
            raise TypeError(
                "Tokenizer() takes a native tokenizer; use Tokenizer.train, from_hf_json, from_tiktoken or from_ranks"
            )
        self._core = core
        self._special_list: List[Tuple[str, int]] = list(core.specials)
        self._special_tokens: Dict[str, int] = dict(self._special_list)
        self._id_to_special: Dict[int, str] = {i: s for s, i in self._special_list}
        n = len(self._special_list)
        self._policy_cache: Dict[Tuple[object, object], bytes] = {}
        self._default_policy = bytes([2] * n)
        self._ordinary_policy = bytes(n)
        # Model-file metadata (GGUF): bos/eos/unk/pad ids, add_bos/add_eos, chat_template.
        self._meta: Dict[str, Any] = dict(meta or {})

    # ------------------------------------------------------------------ construction

    @classmethod
    def train(
        cls,
        data: Union[Iterable[str], Iterable[PathLike]],
        vocab_size: int,
        min_frequency: int = 2,
        special_tokens: Sequence[str] = (),
        pattern: Optional[str] = None,
        *,
        num_threads: Optional[int] = None,
        show_progress: Optional[bool] = None,
    ) -> "Tokenizer":
        """Returns a tokenizer trained with byte-level BPE on ``data``.

        Words are counted on all cores; merges update pair counts incrementally. The same data
        and arguments always give the same vocabulary (ties go to the smaller pair of ids).
        Ids: bytes 0..255 are ids 0..255, merges follow in order, special tokens come last.

        Args:
            data: texts (``str``) and/or files (``pathlib.Path`` or other ``os.PathLike``,
                read as UTF-8), as a list or any iterable. A plain ``str`` is always text, never
                a path.
            vocab_size: the size of the vocabulary, special tokens included (>= 256 + their
                number).
            min_frequency: stop merging once the most frequent pair occurs fewer times.
            special_tokens: special tokens to append to the vocabulary.
            pattern: the pre-tokenizer regex, or a name in :data:`PATTERNS` (default GPT-2's).
            num_threads: threads for counting (default: all cores).
            show_progress: show progress bars (default: when stderr is a terminal).

        Returns:
            The trained tokenizer.

        Raises:
            TypeError: ``data`` is a single ``str``/``bytes`` or holds items that are neither
                text nor paths.
            ValueError: ``vocab_size`` is too small or the pattern does not compile.
            FileNotFoundError: a path does not exist.

        Example:
            >>> tok = Tokenizer.train(["the cat sat on the mat"] * 5, vocab_size=270)
            >>> tok.vocab_size
            270
        """
        from tqdm.auto import tqdm

        if isinstance(data, (str, bytes)):
            raise TypeError(
                "data must be a list or iterable of texts or paths, not a single "
                f"{type(data).__name__}; wrap it: Tokenizer.train([text], ...) or Tokenizer.train([Path(file)], ...)"
            )
        if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
            raise TypeError(f"vocab_size must be an int, got {type(vocab_size).__name__}")
        if vocab_size < 1:
            raise ValueError(
                f"vocab_size must be a positive int (at least 256 plus the special tokens), got {vocab_size}"
            )
        num_threads = _threads(num_threads)
        if not isinstance(min_frequency, int) or min_frequency < 0:
            raise ValueError(f"min_frequency must be a non-negative int, got {min_frequency!r}")
        specials = list(special_tokens)
        for s in specials:
            _check_str(s, "each special token")
        counter = _core.WordCounter(_resolve_pattern(pattern))
        disable = None if show_progress is None else not show_progress
        batch: List[str] = []
        batch_bytes = 0
        with tqdm(desc="counting words", unit="B", unit_scale=True, disable=disable, leave=False) as bar:
            for item in data:
                if isinstance(item, str):
                    batch.append(item)
                    batch_bytes += len(item)
                    if batch_bytes >= 16 << 20:
                        counter.add_texts(batch, num_threads)
                        bar.update(batch_bytes)
                        batch, batch_bytes = [], 0
                elif isinstance(item, os.PathLike):
                    path = Path(item)
                    if not path.is_file():
                        raise FileNotFoundError(f"training file {str(path)!r} does not exist or is not a file")
                    counter.add_files([str(path)], num_threads)
                    bar.update(path.stat().st_size)
                else:
                    raise TypeError(
                        f"training data items must be str (text) or os.PathLike (file), got {type(item).__name__}"
                    )
            if batch:
                counter.add_texts(batch, num_threads)
                bar.update(batch_bytes)
        trainer = counter.into_trainer(vocab_size, min_frequency, specials)
        with tqdm(total=trainer.target_merges, desc="merging", unit="merge", disable=disable, leave=False) as bar:
            chunk = max(1, trainer.target_merges // 100)
            while True:
                k = trainer.step(chunk)
                if k == 0:
                    break
                bar.update(k)
        return cls(trainer.finish())

    @classmethod
    def from_file(cls, path: PathLike, pattern: str = "r50k_base") -> "Tokenizer":
        """A tokenizer file by its suffix: a tiktoken rank file (``.tiktoken``, split with
        ``pattern``) or an HF ``tokenizer.json`` (anything else).

        Raises:
            FileNotFoundError: no such file. FormatError: a malformed file.
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist")
        return cls.from_tiktoken(path, pattern) if path.suffix == ".tiktoken" else cls.from_hf_json(path)

    @classmethod
    def from_hf_json(cls, path: PathLike) -> "Tokenizer":
        """Returns the tokenizer stored in an HF tokenizers ``tokenizer.json``.

        Any BPE model with HF's components: normalizers (NFC/NFD/NFKC/NFKD, Lowercase, Strip,
        Replace, Prepend, BertNormalizer, Sequence), pre-tokenizers (ByteLevel, Split, Digits, Metaspace,
        Whitespace, WhitespaceSplit, Punctuation, BertPreTokenizer, Sequence), byte fallback,
        ``unk_token``, ``continuing_subword_prefix``, ``end_of_word_suffix``, ``ignore_merges``,
        added tokens with their lstrip/rstrip/single_word/normalized flags, post-processors
        (TemplateProcessing, RobertaProcessing, BertProcessing, ByteLevel, Sequence) and
        decoders (ByteLevel, Metaspace, ByteFallback, Fuse, Strip, Replace, BPEDecoder,
        Sequence). Special added tokens follow the ``allowed_special`` rules of
        :meth:`encode`; non-special added tokens are always matched, as in HF. Ids equal HF's
        ``encode(text, add_special_tokens=False)`` with special tokens allowed, and
        ``encode(..., add_special_tokens=True)`` adds what the post-processor adds. The plain
        GPT-2/cl100k shape runs on the byte-level fast path; see ``docs/tokenizers.md``.

        Raises:
            FileNotFoundError: no such file.
            FormatError: the file is not valid JSON, or holds a component ferrolm does not
                support (the message names it and its JSON path).
        """
        text = Path(path).read_bytes()
        try:
            decoded = text.decode("utf-8")
        except UnicodeDecodeError as e:
            from .errors import FormatError

            raise FormatError(f"{path}: tokenizer.json is not UTF-8 ({e})") from None
        return cls(_core.CoreTokenizer.from_hf_json_str(decoded))

    @classmethod
    def from_pretrained(cls, folder: PathLike) -> "Tokenizer":
        """Returns the tokenizer of a saved HF/transformers model folder.

        Reads ``tokenizer.json`` (see :meth:`from_hf_json`), then ``tokenizer_config.json``
        and ``special_tokens_map.json`` when present: the bos/eos/unk/pad tokens (as ids in
        :attr:`bos_token_id` ...), ``add_bos_token``/``add_eos_token``, and the chat template
        (``chat_template`` in the config, a named ``"default"`` one from a list, or a
        ``chat_template.jinja`` file). Nothing is downloaded.

        Args:
            folder: a folder as written by transformers' ``save_pretrained``.

        Raises:
            FileNotFoundError: no such folder, or it has no ``tokenizer.json``.
            FormatError: a file that is not valid JSON, or a special token the vocabulary lacks.

        Example:
            >>> tok = Tokenizer.from_pretrained("SmolLM2-135M-Instruct")  # doctest: +SKIP
            >>> tok.apply_chat_template([{"role": "user", "content": "Hi"}])  # doctest: +SKIP
        """
        import json

        folder = Path(folder)
        if not folder.is_dir():
            raise FileNotFoundError(f"model folder {str(folder)!r} does not exist or is not a folder")
        if not (folder / "tokenizer.json").is_file():
            raise FileNotFoundError(
                f"{folder} has no tokenizer.json; ferrolm reads the fast-tokenizer file "
                "(transformers' save_pretrained writes it for fast tokenizers)"
            )
        tok = cls.from_hf_json(folder / "tokenizer.json")

        def read(name: str) -> Dict[str, Any]:
            path = folder / name
            if not path.is_file():
                return {}
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as e:
                raise FormatError(f"{path}: not valid JSON ({e})") from None
            if not isinstance(data, dict):
                raise FormatError(f"{path}: expected a JSON object, got {type(data).__name__}")
            return data

        config = read("tokenizer_config.json")
        special_map = read("special_tokens_map.json")
        meta: Dict[str, Any] = {}
        for name in ("bos", "eos", "unk", "pad"):
            value = config.get(f"{name}_token")
            if value is None:
                value = special_map.get(f"{name}_token")
            if isinstance(value, dict):
                value = value.get("content")
            if value is None:
                continue
            if not isinstance(value, str):
                raise FormatError(f"{folder}: {name}_token should be a string, got {value!r:.80}")
            meta[f"{name}_token_id"] = tok._id_of_text(value, f"{folder}: {name}_token")
        for name in ("add_bos_token", "add_eos_token"):
            if isinstance(config.get(name), bool):
                meta[name] = config[name]
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if template is None and (folder / "chat_template.jinja").is_file():
            template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        if template is not None:
            if not isinstance(template, str):
                raise FormatError(f"{folder}: chat_template should be a string, got {type(template).__name__}")
            meta["chat_template"] = template
        return cls(tok._core, meta)

    def _id_of_text(self, text: str, what: str) -> int:
        i = self._special_tokens.get(text)
        if i is None:
            i = self._core.token_id(text.encode("utf-8"))
        if i is None:
            raw = bytes(_CHAR_TO_BYTE[c] for c in text) if all(c in _CHAR_TO_BYTE for c in text) else None
            i = self._core.token_id(raw) if raw is not None else None
        if i is None:
            raise FormatError(f"{what} = {text!r} is not a token of tokenizer.json")
        return i

    @classmethod
    def from_gguf(cls, path: PathLike) -> "Tokenizer":
        """Returns the tokenizer stored in a GGUF model file (llama.cpp's format).

        Reads ``tokenizer.ggml.*``: a byte-level BPE vocabulary (``model = "gpt2"``) and its
        merges, or a SentencePiece BPE vocabulary (``model = "llama"``: scores, ``<0xXX>`` byte
        fallback, ``add_space_prefix``; merged by score as llama.cpp does, which is HF's
        Llama tokenizer.json pipeline), control/user-defined/unknown tokens as special tokens, the bos/eos/unk/pad ids,
        ``add_bos_token``, and ``tokenizer.chat_template``. Text is split as llama.cpp splits it
        for ``tokenizer.ggml.pre`` (``smollm``: every digit alone, then GPT-2's pattern;
        ``llama-bpe``, ``qwen2``, ``gpt-2``, ``default`` ...). A single byte the vocabulary has
        no token for is dropped, as HF tokenizers does without an unknown token.

        Args:
            path: the ``.gguf`` file (read with the ``gguf`` package; only metadata is used).

        Returns:
            The tokenizer; :attr:`bos_token_id`, :attr:`chat_template` etc. carry the metadata.

        Raises:
            FileNotFoundError: no such file.
            ImportError: the ``gguf`` package is not installed.
            FormatError: not a GGUF file, a missing or malformed tokenizer entry, an unknown
                ``tokenizer.ggml.pre``, or a vocabulary that is not byte-level BPE.

        Example:
            >>> tok = Tokenizer.from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")  # doctest: +SKIP
            >>> tok.encode("Hello world! 123")  # doctest: +SKIP
            [19556, 905, 17, 216, 33, 34, 35]
        """
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {str(path)!r} does not exist or is not a file")
        try:
            import gguf
        except ImportError:
            raise ImportError("Tokenizer.from_gguf needs the gguf package: pip install gguf") from None
        try:
            reader = gguf.GGUFReader(str(path))
        except Exception as e:  # the reader raises ValueError, struct errors, IndexError ...
            raise FormatError(f"{path}: not a readable GGUF file ({type(e).__name__}: {e})") from None
        fields = reader.fields

        def get(key: str, kind: type, *, array: bool = False, required: bool = False) -> Any:
            field = fields.get(key)
            if field is None:
                if required:
                    raise FormatError(f"{path}: GGUF metadata has no {key}; is this a model with a tokenizer?")
                return None
            try:
                value = field.contents()
            except Exception as e:  # a malformed field: whatever the reader raises
                raise FormatError(f"{path}: GGUF metadata {key} cannot be read ({type(e).__name__}: {e})") from None
            if array and not isinstance(value, list):
                raise FormatError(f"{path}: GGUF metadata {key} should be an array, got {type(value).__name__}")
            for v in value if array else [value]:
                if not isinstance(v, kind) or (kind is int and isinstance(v, bool)):
                    what = f"an array of {kind.__name__}" if array else kind.__name__
                    raise FormatError(f"{path}: GGUF metadata {key} should be {what}, got {v!r:.80}")
            return value

        model = get("tokenizer.ggml.model", str, required=True)
        tokens = get("tokenizer.ggml.tokens", str, array=True, required=True)
        merges = get("tokenizer.ggml.merges", str, array=True) or []
        token_types = get("tokenizer.ggml.token_type", int, array=True)
        scores = get("tokenizer.ggml.scores", float, array=True)
        try:
            core = _core.CoreTokenizer.from_gguf_vocab(
                model,
                get("tokenizer.ggml.pre", str),
                tokens,
                token_types,
                merges,
                scores,
                get("tokenizer.ggml.add_space_prefix", bool),
            )
        except FormatError as e:
            raise FormatError(f"{path}: {e}") from None
        meta: Dict[str, Any] = {}
        for name in ("bos", "eos", "unknown", "padding"):
            i = get(f"tokenizer.ggml.{name}_token_id", int)
            if i is not None:
                if not 0 <= i < len(tokens):
                    raise FormatError(
                        f"{path}: GGUF tokenizer.ggml.{name}_token_id = {i} is not a token id (0..{len(tokens) - 1})"
                    )
                meta[{"unknown": "unk", "padding": "pad"}.get(name, name) + "_token_id"] = i
        for name in ("add_bos_token", "add_eos_token"):
            flag = get(f"tokenizer.ggml.{name}", bool)
            if flag is not None:
                meta[name] = flag
        template = get("tokenizer.chat_template", str)
        if template is not None:
            meta["chat_template"] = template
        return cls(core, meta)

    def save_hf_json(self, path: PathLike) -> None:
        """Writes this tokenizer as an HF ``tokenizer.json`` (atomically).

        ``tokenizers.Tokenizer.from_file(path)`` then gives the same ids.
        """
        atomic_write(path, self._core.to_hf_json().encode("utf-8"))

    def to_hf_json(self) -> str:
        """Returns the HF ``tokenizer.json`` text of this tokenizer."""
        return self._core.to_hf_json()

    @classmethod
    def from_tiktoken(
        cls,
        path: PathLike,
        pattern: Optional[str] = None,
        special_tokens: Optional[Dict[str, int]] = None,
    ) -> "Tokenizer":
        """Returns a tokenizer from a tiktoken rank file (``base64(token) rank`` per line).

        Args:
            path: the ``.tiktoken`` file (read locally; nothing is downloaded).
            pattern: the pre-tokenizer regex or a name in :data:`PATTERNS` (default ``"gpt2"``;
                use ``"cl100k_base"`` for cl100k).
            special_tokens: special token text to id, e.g. ``{"<|endoftext|>": 50256}``.

        Raises:
            FileNotFoundError: no such file.
            FormatError: a malformed line, duplicate rank, or missing byte token.

        Example:
            >>> tok = Tokenizer.from_tiktoken("gpt2.tiktoken", "gpt2", {"<|endoftext|>": 50256})  # doctest: +SKIP
            >>> tok.encode("hello world")  # doctest: +SKIP
            [31373, 995]
        """
        data = Path(path).read_bytes()
        specials = _special_items(special_tokens)
        return cls(_core.CoreTokenizer.from_tiktoken_bytes(data, _resolve_pattern(pattern), specials))

    def save_tiktoken(self, path: PathLike) -> None:
        """Writes the mergeable tokens as a tiktoken rank file (atomically). Special tokens are
        not part of that format: pass :attr:`special_tokens` to ``tiktoken.Encoding``."""
        atomic_write(path, self._core.to_tiktoken().encode("ascii"))

    @classmethod
    def from_ranks(
        cls,
        mergeable_ranks: Dict[bytes, int],
        pattern: Optional[str] = None,
        special_tokens: Optional[Dict[str, int]] = None,
    ) -> "Tokenizer":
        """Returns a tokenizer from the arguments a ``tiktoken.Encoding`` takes.

        Example:
            >>> import tiktoken  # doctest: +SKIP
            >>> enc = tiktoken.get_encoding("gpt2")  # doctest: +SKIP
            >>> tok = Tokenizer.from_ranks(enc._mergeable_ranks, enc._pat_str, enc._special_tokens)  # doctest: +SKIP
        """
        if not isinstance(mergeable_ranks, dict):
            raise TypeError(f"mergeable_ranks must be a dict of bytes to int, got {type(mergeable_ranks).__name__}")
        ranks = list(mergeable_ranks.items())
        return cls(_core.CoreTokenizer.from_ranks(ranks, _resolve_pattern(pattern), _special_items(special_tokens)))

    # ------------------------------------------------------------------ properties

    @property
    def vocab_size(self) -> int:
        """Number of tokens, special tokens included."""
        return self._core.vocab_size

    @property
    def n_vocab(self) -> int:
        """One past the largest token id (tiktoken's ``n_vocab``)."""
        return self._core.n_vocab

    @property
    def max_token_value(self) -> int:
        """The largest token id."""
        return self._core.n_vocab - 1

    @property
    def special_tokens(self) -> Dict[str, int]:
        """Special token text to id."""
        return dict(self._special_tokens)

    @property
    def special_tokens_set(self) -> AbstractSet[str]:
        """The special tokens' texts."""
        return frozenset(self._special_tokens)

    @property
    def eot_token(self) -> int:
        """The id of ``<|endoftext|>``."""
        try:
            return self._special_tokens["<|endoftext|>"]
        except KeyError:
            raise UnknownTokenError("this tokenizer has no <|endoftext|> special token") from None

    @property
    def pattern(self) -> str:
        """The pre-tokenizer regex."""
        return self._core.pattern

    @property
    def patterns(self) -> List[str]:
        """The pre-tokenizer regexes: one, or the stages of a llama.cpp-style chain in order (each
        splits the pieces of the one before)."""
        return self._core.patterns

    @property
    def bos_token_id(self) -> Optional[int]:
        """The beginning-of-sequence id from the model file, or None."""
        return self._meta.get("bos_token_id")

    @property
    def eos_token_id(self) -> Optional[int]:
        """The end-of-sequence id from the model file, or None."""
        return self._meta.get("eos_token_id")

    @property
    def unk_token_id(self) -> Optional[int]:
        """The unknown-token id from the model file, or None."""
        return self._meta.get("unk_token_id")

    @property
    def pad_token_id(self) -> Optional[int]:
        """The padding id from the model file, or None."""
        return self._meta.get("pad_token_id")

    @property
    def add_bos(self) -> bool:
        """Whether the model expects the bos token before a prompt (GGUF ``add_bos_token``)."""
        return bool(self._meta.get("add_bos_token", False))

    @property
    def add_eos(self) -> bool:
        """Whether the model expects the eos token after a prompt (GGUF ``add_eos_token``)."""
        return bool(self._meta.get("add_eos_token", False))

    @property
    def chat_template(self) -> Optional[str]:
        """The Jinja chat template from the model file, or None."""
        return self._meta.get("chat_template")

    @property
    def merge_rule(self) -> str:
        """``"ranks"`` (tiktoken: any adjacent pair forming a token merges, lowest id first) or
        ``"merges"`` (HF: only listed merges, in list order)."""
        return self._core.merge_rule

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return (
            f"<ferrolm.Tokenizer vocab_size={self.vocab_size} specials={len(self._special_list)} "
            f"rule={self.merge_rule}>"
        )

    def __reduce__(self):
        # Picklable (DataLoader workers under spawn): the HF format keeps merges, the tiktoken
        # format keeps ranks; each restores the same merge rule.
        if self.merge_rule == "merges":
            return (_from_hf_json_text, (self._core.to_hf_json(), self._meta))
        return (_from_tiktoken_text, (self._core.to_tiktoken(), self.pattern, dict(self._special_list), self._meta))

    # ------------------------------------------------------------------ encoding

    def _policy(self, allowed_special: SpecialSet, disallowed_special: Union[Literal["all"], Collection[str]]) -> bytes:
        if allowed_special is _EMPTY and disallowed_special == "all":
            return self._default_policy
        key = (
            allowed_special if allowed_special == "all" else frozenset(allowed_special),
            disallowed_special if disallowed_special == "all" else frozenset(disallowed_special),
        )
        cached = self._policy_cache.get(key)
        if cached is not None:
            return cached
        names = self._special_tokens
        allowed = set(names) if allowed_special == "all" else set(allowed_special)
        disallowed = set(names) - allowed if disallowed_special == "all" else set(disallowed_special)
        for what, group in (("allowed_special", allowed), ("disallowed_special", disallowed)):
            unknown = sorted(s for s in group if s not in names)
            if unknown:
                raise ValueError(
                    f"{what} names {unknown}, which are not special tokens of this tokenizer (it has {sorted(names)})"
                )
        policy = bytes(1 if s in allowed else 2 if s in disallowed else 0 for s, _ in self._special_list)
        if len(self._policy_cache) < 64:
            self._policy_cache[key] = policy
        return policy

    def encode(
        self,
        text: str,
        *,
        allowed_special: SpecialSet = _EMPTY,
        disallowed_special: Union[Literal["all"], Collection[str]] = "all",
        add_special_tokens: bool = False,
    ) -> List[int]:
        """Returns the token ids of ``text``.

        Special tokens follow tiktoken's rules: text matching a special token in
        ``allowed_special`` becomes that token; one in ``disallowed_special`` (by default every
        special token not allowed) raises ``ValueError``; any other is encoded as plain text.

        Args:
            text: the text to encode (lone surrogates are replaced by U+FFFD).
            allowed_special: ``"all"`` or a set of special token texts.
            disallowed_special: ``"all"`` or a collection of special token texts.
            add_special_tokens: add the ids the file's post-processor adds around a text
                (BOS/EOS of a ``TemplateProcessing``, Roberta's ``<s>``/``</s>``), as HF's
                ``encode`` does by default; for a file without one, BOS/EOS where the model
                file sets ``add_bos_token``/``add_eos_token`` (GGUF).

        Returns:
            ids: list of ints in [0, n_vocab).

        Raises:
            TypeError: ``text`` is not a str.
            ValueError: a disallowed special token appears in ``text``.

        Example:
            >>> tok = Tokenizer.train(["hello world"] * 4, 260, special_tokens=["<|endoftext|>"])
            >>> tok.encode("hello<|endoftext|>", allowed_special="all")[-1] == tok.eot_token
            True
        """
        ids = self._core.encode(text, self._policy(allowed_special, disallowed_special))
        if add_special_tokens:
            before, after = self._special_ids()
            if before or after:
                return [*before, *ids, *after]
        return ids

    def _special_ids(self) -> Tuple[List[int], List[int]]:
        # The file's post-processor; without one, the model file's add_bos/add_eos (GGUF).
        before, after = self._core.post_ids
        if before or after:
            return before, after
        bos, eos = self._meta.get("bos_token_id"), self._meta.get("eos_token_id")
        return (
            [bos] if self.add_bos and bos is not None else [],
            [eos] if self.add_eos and eos is not None else [],
        )

    def encode_ordinary(self, text: str) -> List[int]:
        """Returns the token ids of ``text``, treating special tokens as plain text."""
        return self._core.encode_ordinary(text)

    def encode_to_numpy(
        self,
        text: str,
        *,
        allowed_special: SpecialSet = _EMPTY,
        disallowed_special: Union[Literal["all"], Collection[str]] = "all",
    ) -> np.ndarray:
        """Returns the ids of ``text`` as a (N,) uint32 numpy array (no Python ints made)."""
        return self._core.encode_to_numpy(text, self._policy(allowed_special, disallowed_special))

    def encode_batch(
        self,
        texts: Sequence[str],
        *,
        num_threads: Optional[int] = None,
        allowed_special: SpecialSet = _EMPTY,
        disallowed_special: Union[Literal["all"], Collection[str]] = "all",
    ) -> List[List[int]]:
        """Returns the ids of each text, encoded in parallel in Rust with the GIL released.

        Args:
            texts: list of str.
            num_threads: threads to use (default: all cores; 1 in a forked child).
            allowed_special, disallowed_special: as in :meth:`encode`.
        """
        return self._core.encode_batch(texts, self._policy(allowed_special, disallowed_special), _threads(num_threads))

    def encode_ordinary_batch(self, texts: Sequence[str], *, num_threads: Optional[int] = None) -> List[List[int]]:
        """Returns the ids of each text, special tokens treated as plain text (parallel)."""
        return self._core.encode_batch(texts, self._ordinary_policy, _threads(num_threads))

    def encode_batch_to_numpy(
        self,
        texts: Sequence[str],
        *,
        pad_id: int = 0,
        max_length: Optional[int] = None,
        padding_side: Literal["right", "left"] = "right",
        num_threads: Optional[int] = None,
        allowed_special: SpecialSet = _EMPTY,
        disallowed_special: Union[Literal["all"], Collection[str]] = "all",
    ) -> Tuple[np.ndarray, np.ndarray]:
        """Returns a padded batch: ``(ids, lengths)``.

        Returns:
            ids: (B, T) int64, T = the longest encoding (or ``max_length``, truncating longer
                rows from the end), padded with ``pad_id`` on ``padding_side``.
            lengths: (B,) int64, the number of real tokens in each row.
        """
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        if max_length is not None and (not isinstance(max_length, int) or max_length < 0):
            raise ValueError(f"max_length must be a non-negative int or None, got {max_length!r}")
        policy = self._policy(allowed_special, disallowed_special)
        return self._core.encode_batch_padded(
            texts, policy, int(pad_id), max_length, padding_side == "left", _threads(num_threads)
        )

    # ------------------------------------------------------------------ decoding

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        """Returns the bytes of ``ids`` concatenated.

        Raises:
            UnknownTokenError: an id that is negative or not in the vocabulary.
        """
        ids = _as_id_list(ids)
        try:
            return self._core.decode_bytes(ids)
        except (TypeError, OverflowError):
            bad = next((x for x in ids if not isinstance(x, int) or isinstance(x, bool)), None)
            if bad is not None:
                raise TypeError(f"ids must be ints, got {type(bad).__name__} ({bad!r})") from None
            raise UnknownTokenError(f"token ids out of range: {[x for x in ids if not 0 <= x < 2**63][:5]}") from None

    def decode(self, ids: Sequence[int], errors: str = "replace", *, skip_special_tokens: bool = False) -> str:
        """Returns the text of ``ids``.

        A tokenizer read from a ``tokenizer.json`` with HF's pipeline runs the file's decoder
        and returns what HF's ``decode`` returns (``errors`` does not apply there).

        Args:
            ids: token ids (list, numpy array or torch tensor).
            errors: how bytes that are not valid UTF-8 decode (``"replace"``: U+FFFD;
                ``"strict"``: raise ``UnicodeDecodeError``; any Python codec error handler).
            skip_special_tokens: leave special tokens out.
        """
        if self._core.has_pipeline or skip_special_tokens:
            ids = _as_id_list(ids)
            try:
                return self._core.decode_text(ids, skip_special_tokens)
            except (TypeError, OverflowError):
                self.decode_bytes(ids)  # raises the precise error
                raise
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def decode_batch(
        self, batch: Sequence[Sequence[int]], errors: str = "replace", *, num_threads: Optional[int] = None
    ) -> List[str]:
        """Returns the text of each id sequence (decoded in parallel)."""
        rows = [_as_id_list(ids) for ids in batch]
        try:
            out = self._core.decode_bytes_batch(rows, _threads(num_threads))
        except (TypeError, OverflowError):
            for ids in rows:
                self.decode_bytes(ids)  # raises the precise error
            raise
        return [b.decode("utf-8", errors=errors) for b in out]

    def decode_bytes_batch(self, batch: Sequence[Sequence[int]], *, num_threads: Optional[int] = None) -> List[bytes]:
        """Returns the bytes of each id sequence."""
        return self._core.decode_bytes_batch([_as_id_list(ids) for ids in batch], _threads(num_threads))

    def decode_single_token_bytes(self, token: int) -> bytes:
        """Returns the bytes of one token."""
        b = self._core.token_bytes(int(token))
        if b is None:
            raise UnknownTokenError(f"token id {token} is not in the vocabulary (ids 0..{self.n_vocab - 1})")
        return b

    def decode_tokens_bytes(self, tokens: Sequence[int]) -> List[bytes]:
        """Returns the bytes of each token."""
        return [self.decode_single_token_bytes(t) for t in _as_id_list(tokens)]

    # ------------------------------------------------------------------ chat

    def apply_chat_template(
        self,
        messages: Sequence[Dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        *,
        chat_template: Optional[str] = None,
        **kwargs: Any,
    ) -> Union[List[int], str]:
        """Returns the ids (or the text) of a conversation rendered with a Jinja chat template.

        The template runs as transformers runs it: jinja2's ``ImmutableSandboxedEnvironment``
        with ``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a
        ``{% generation %}`` block, ``raise_exception``, ``strftime_now``, ``tojson`` (no HTML
        escaping) and a namespace that refuses underscore names. It sees ``messages``,
        ``add_generation_prompt``, ``bos_token``/``eos_token``/``unk_token``/``pad_token`` and
        ``kwargs``. The text is encoded with every special token allowed and no bos added, as
        transformers' ``apply_chat_template`` does.

        Args:
            messages: dicts with ``role`` and ``content`` (and whatever else the template reads).
            add_generation_prompt: end with the header of an assistant turn.
            tokenize: return ids (True) or the rendered text (False).
            chat_template: the template (default: :attr:`chat_template` from the model file).
            **kwargs: more variables for the template (``tools``, ``documents`` ...).

        Returns:
            The ids as a list of ints, or the text.

        Raises:
            ImportError: jinja2 is not installed.
            ValueError: no template, or the template raised (``raise_exception``) or failed.

        Example:
            >>> tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False)  # doctest: +SKIP
            '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, ...'
        """
        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            raise ValueError(
                "this tokenizer has no chat template; pass chat_template=... (a Jinja string) or load a model file "
                "that carries one (Tokenizer.from_gguf)"
            )
        if isinstance(messages, dict) or isinstance(messages, str):
            raise TypeError("messages must be a list of dicts like {'role': 'user', 'content': '...'}")
        import jinja2

        names = {"bos_token": "bos_token_id", "eos_token": "eos_token_id", "unk_token": "unk_token_id"}
        names["pad_token"] = "pad_token_id"
        variables: Dict[str, Any] = {}
        for var, key in names.items():
            i = self._meta.get(key)
            if i is not None:
                variables[var] = self.decode_single_token_bytes(i).decode("utf-8", errors="replace")
        variables.update(kwargs)
        try:
            text = _compile_chat_template(template).render(
                messages=list(messages), add_generation_prompt=add_generation_prompt, **variables
            )
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template failed: {e}") from e
        if not tokenize:
            return text
        return self.encode(text, allowed_special="all")

    # ------------------------------------------------------------------ vocabulary

    def _vocab_strings(self) -> Optional[List[Optional[str]]]:
        # HF's token strings of a pipeline tokenizer (None for the byte-level fast path).
        if not hasattr(self, "_strings"):
            self._strings = self._core.vocab_strings()
            self._string_ids = {s: i for i, s in enumerate(self._strings or []) if s is not None}
        return self._strings

    def id_to_token(self, id: int) -> str:
        """Returns the token's text as HF shows it: special tokens as written, others in
        ByteLevel form (``" hello"`` is ``"Ġhello"``), or the vocab string of a
        SentencePiece-style file (``"▁hello"``)."""
        strings = self._vocab_strings()
        if strings is not None:
            s = strings[id] if isinstance(id, int) and 0 <= id < len(strings) else None
            if s is None:
                raise UnknownTokenError(f"token id {id} is not in the vocabulary (ids 0..{len(strings) - 1})")
            return s
        if id in self._id_to_special:
            return self._id_to_special[id]
        b = self.decode_single_token_bytes(id)
        return "".join(_BYTE_TO_CHAR[x] for x in b)

    def token_to_id(self, token: Union[str, bytes]) -> int:
        """Returns the id of a token given as HF ByteLevel text (``"Ġhello"``), a special
        token's text, or raw ``bytes``.

        Raises:
            UnknownTokenError: no such token.
        """
        if isinstance(token, str):
            if token in self._special_tokens:
                return self._special_tokens[token]
            if self._vocab_strings() is not None:
                if token not in self._string_ids:
                    raise UnknownTokenError(f"token {token!r} is not in the vocabulary")
                return self._string_ids[token]
            try:
                raw = bytes(_CHAR_TO_BYTE[c] for c in token)
            except KeyError:
                raise UnknownTokenError(
                    f"token {token!r} is not in the vocabulary (tokens are ByteLevel text like 'Ġhello', or bytes)"
                ) from None
        elif isinstance(token, (bytes, bytearray)):
            raw = bytes(token)
        else:
            raise TypeError(f"token must be str or bytes, got {type(token).__name__}")
        i = self._core.token_id(raw)
        if i is None:
            raise UnknownTokenError(f"token {token!r} is not in the vocabulary")
        return i

    def get_vocab(self) -> Dict[str, int]:
        """Returns HF-style ``{ByteLevel text: id}`` for every token, special ones included."""
        if self._vocab_strings() is not None:
            return dict(self._string_ids)
        table = self._core.token_table()
        vocab = {
            "".join(_BYTE_TO_CHAR[x] for x in b): i
            for i, b in enumerate(table)
            if b is not None and i not in self._id_to_special
        }
        vocab.update(self._special_tokens)
        return vocab

    def merges(self) -> List[Tuple[int, int]]:
        """Returns the merge list as ``(left id, right id)`` pairs in rank order."""
        return self._core.merges()

    def pre_tokenize(self, text: str) -> List[str]:
        """Returns the pieces the pre-tokenizer cuts ``text`` into."""
        return self._core.pre_tokenize(text)


@functools.lru_cache(maxsize=16)
def _compile_chat_template(template: str):
    """A chat template compiled in the environment transformers uses (see apply_chat_template)."""
    import json
    from datetime import datetime

    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(jinja2.ext.Extension):
        # transformers marks assistant text with {% generation %}...{% endgeneration %}; it renders as is.
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class Namespace(jinja2.utils.Namespace):
        # No dunder or private attributes: templates are untrusted code.
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                Namespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            Namespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["namespace"] = Namespace
    return env.from_string(template)


def _special_items(special_tokens: Optional[Dict[str, int]]) -> List[Tuple[str, int]]:
    if special_tokens is None:
        return []
    if not isinstance(special_tokens, dict):
        raise TypeError(f"special_tokens must be a dict of str to int, got {type(special_tokens).__name__}")
    items = []
    for s, i in special_tokens.items():
        _check_str(s, "special token")
        if not isinstance(i, int) or i < 0 or i >= 2**32:
            raise ValueError(f"special token {s!r} needs an id in [0, 2**32), got {i!r}")
        items.append((s, i))
    return items


def _from_hf_json_text(text: str, meta: Optional[Dict[str, Any]] = None) -> Tokenizer:
    return Tokenizer(_core.CoreTokenizer.from_hf_json_str(text), meta)


def _from_tiktoken_text(
    text: str, pattern: str, specials: Dict[str, int], meta: Optional[Dict[str, Any]] = None
) -> Tokenizer:
    core = _core.CoreTokenizer.from_tiktoken_bytes(text.encode("ascii"), pattern, list(specials.items()))
    return Tokenizer(core, meta)
