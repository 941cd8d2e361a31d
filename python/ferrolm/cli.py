"""The ``ferrolm`` command. It only parses arguments and calls library functions."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_benchmarks

    areas = tuple(args.only.split(",")) if args.only else ("tokenizer", "data", "rnn", "attention")
    run_benchmarks(full=args.full, json_path=args.json, areas=areas)
    return 0


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    from .corpus import default_corpus
    from .tokenizer import Tokenizer

    data: List = [Path(p) for p in args.files] if args.files else default_corpus(args.max_bytes)
    tok = Tokenizer.train(
        data,
        vocab_size=args.vocab_size,
        min_frequency=args.min_frequency,
        special_tokens=args.special or ["<|endoftext|>"],
        pattern=args.pattern,
        num_threads=args.num_threads,
        show_progress=True,
    )
    out = Path(args.out)
    if out.suffix == ".tiktoken":
        tok.save_tiktoken(out)
    else:
        tok.save_hf_json(out)
    print(f"wrote {out} ({tok.vocab_size} tokens)")
    return 0


def _cmd_tokenizer_encode(args: argparse.Namespace) -> int:
    from .tokenizer import Tokenizer

    path = Path(args.tokenizer)
    tok = Tokenizer.from_tiktoken(path, args.pattern) if path.suffix == ".tiktoken" else Tokenizer.from_hf_json(path)
    text = sys.stdin.read() if args.text is None else args.text
    print(" ".join(map(str, tok.encode(text, allowed_special="all"))))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ferrolm", description="ferrolm: language models on ordinary CPUs")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="run the benchmark suite (quick by default) and print ferrolm vs the references")
    b.add_argument("--full", action="store_true", help="the whole grid (slow) instead of the quick set")
    b.add_argument("--json", default=None, help="also write the results to this JSON file")
    b.add_argument("--only", default=None, help="comma-separated areas to run (tokenizer, data, rnn, attention)")
    b.set_defaults(func=_cmd_bench)

    t = sub.add_parser("tokenizer", help="train or use a tokenizer")
    tsub = t.add_subparsers(dest="tokenizer_command", required=True)
    tr = tsub.add_parser("train", help="train a byte-level BPE tokenizer (default: on the embedded corpus)")
    tr.add_argument("files", nargs="*", help="UTF-8 text files (default: the embedded corpus)")
    tr.add_argument("--vocab-size", type=int, default=8192)
    tr.add_argument("--min-frequency", type=int, default=2)
    tr.add_argument("--special", action="append", help="a special token (repeatable; default <|endoftext|>)")
    tr.add_argument("--pattern", default=None, help="pre-tokenizer regex or name (gpt2, cl100k_base)")
    tr.add_argument("--max-bytes", type=int, default=None, help="use only this much of the embedded corpus")
    tr.add_argument("--num-threads", type=int, default=None)
    tr.add_argument("--out", default="tokenizer.json", help="output file: .json (HF) or .tiktoken")
    tr.set_defaults(func=_cmd_tokenizer_train)
    en = tsub.add_parser("encode", help="print the ids of a text (or stdin)")
    en.add_argument("tokenizer", help="tokenizer.json or .tiktoken file")
    en.add_argument("text", nargs="?", default=None)
    en.add_argument("--pattern", default=None, help="pattern for .tiktoken files (default gpt2)")
    en.set_defaults(func=_cmd_tokenizer_encode)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
