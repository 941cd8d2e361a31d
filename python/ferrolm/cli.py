"""The ``ferrolm`` command. It only parses arguments and calls library functions."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import List, Optional


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_benchmarks

    from .bench import AREAS

    areas = tuple(a.strip() for a in args.only.split(",")) if args.only else AREAS
    report = None if args.no_report else args.report
    plot = None if args.no_report else args.plot
    run_benchmarks(full=args.full, json_path=args.json, areas=areas, report=report, plot=plot, repeats=args.repeats)
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


def _load_tokenizer(path: Path):
    from .tokenizer import Tokenizer

    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    return Tokenizer.from_tiktoken(path, "r50k_base") if path.suffix == ".tiktoken" else Tokenizer.from_hf_json(path)


def _is_shard(path: Path) -> bool:
    with open(path, "rb") as f:
        return f.read(7) == b"FLMTOKS"


def _expand(paths: List[str]) -> List[Path]:
    out: List[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.iterdir() if q.is_file() and not q.name.startswith("."))
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"data path {p} does not exist")
    if paths and not out:
        raise ValueError(f"no files found in {paths}")
    return out


def _cmd_train_seq2seq(args: argparse.Namespace) -> int:
    from .recipes.translation import TranslationTask, load_pairs, number_task, train_seq2seq

    if args.data:
        if len(args.data) != 1:
            raise ValueError("seq2seq training takes one pairs file (TSV: source<TAB>target, or JSONL with source/target)")
        pairs = load_pairs(args.data[0])
        test = load_pairs(args.test) if args.test else None
        if test is None:  # hold out the last 5% (at least one pair) for testing
            cut = max(1, len(pairs) // 20)
            pairs, test = pairs[:-cut], pairs[-cut:]
        n_valid = min(len(pairs) // 20, 1000)
        task = TranslationTask(train=pairs[n_valid:], valid=pairs[:n_valid], test=test, description=f"pairs from {args.data[0]}")
    else:
        task = number_task(seed=args.seed)
    out = Path(args.out or f"runs/seq2seq-{args.model}")
    sizes = dict(dropout=args.dropout, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, ff_size=args.ff_size) \
        if args.model == "transformer" else dict(dropout=args.dropout, n_embd=args.n_embd, hidden_size=args.hidden_size, num_layers=args.num_layers)
    print(f"{task.description}: {len(task.train):,} training / {len(task.valid):,} validation / {len(task.test):,} test pairs -> {out}",
          file=sys.stderr)
    tok = _load_tokenizer(Path(args.tokenizer)) if args.tokenizer else None
    res = train_seq2seq(args.model, task, out, steps=args.steps or 1500, batch_size=args.batch_size or 128, lr=args.lr,
                        vocab_size=args.vocab_size or 512, seed=args.seed, resume=args.resume, beam_size=args.beam,
                        checkpoint_interval=args.checkpoint_interval, tokenizer=tok, **sizes)
    for name, r in res["test"].items():
        print(f"{name}: BLEU {r['bleu']:.2f}, chrF {r['chrf']:.2f}, exact match {r['exact_match']:.3f} on {r['n']} held-out pairs "
              f"({r['sentences_per_s']:.0f} sentences/s)")
    print(f"{res['parameters']:,} parameters, {res['steps']} steps in {res['train_seconds']:.0f} s; results in {out / 'results.json'}"
          + (" (interrupted; continue with --resume)" if res["interrupted"] else ""))
    return 130 if res["interrupted"] else 0


def _cmd_translate(args: argparse.Namespace) -> int:
    from .models import load_model
    from .recipes.translation import translate_texts

    path = Path(args.model)
    ckpt = path / "model.safetensors" if path.is_dir() else path
    if not ckpt.is_file():
        raise FileNotFoundError(f"no model at {ckpt}; pass a folder from `ferrolm train seq2seq` or its model.safetensors")
    model = load_model(ckpt)
    if not getattr(model, "is_encoder_decoder", False):
        raise ValueError(f"{ckpt} holds a {type(model).__name__}, not a seq2seq model (train one with `ferrolm train seq2seq`)")
    tok = _load_tokenizer(Path(args.tokenizer) if args.tokenizer else ckpt.parent / "tokenizer.json")
    texts = args.text or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not texts:
        raise ValueError("nothing to translate: pass the text as an argument or on stdin")
    for out in translate_texts(model, tok, texts, beam_size=args.beam, max_new_tokens=args.max_new_tokens):
        print(out)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    import numpy as np

    from .corpus import default_corpus
    from .models import GPT, GPTConfig, LSTMConfig, LSTMLanguageModel, load_model
    from .tokenizer import Tokenizer
    from .training import TrainConfig, train

    if args.arch == "seq2seq":
        return _cmd_train_seq2seq(args)
    for name, lm_default in (("steps", 300), ("batch_size", 16), ("lr", 1e-3), ("vocab_size", 4096), ("dropout", 0.0), ("n_layer", 4),
                             ("n_head", 4), ("n_embd", 256), ("hidden_size", 512), ("num_layers", 2)):
        if getattr(args, name) is None:
            setattr(args, name, lm_default)
    out = Path(args.out or f"runs/{args.arch}")
    files = _expand(args.data)
    shards = [f for f in files if _is_shard(f)]
    texts_or_files: List = [f for f in files if f not in shards] if files else default_corpus(args.max_bytes)
    tok_path = Path(args.tokenizer) if args.tokenizer else out / "tokenizer.json"
    if args.tokenizer or (args.resume and tok_path.is_file()):
        tok = _load_tokenizer(tok_path)
    elif shards and not texts_or_files:
        raise ValueError("token shards need the tokenizer that wrote them: pass --tokenizer")
    else:
        print(f"training a {args.vocab_size}-token BPE tokenizer on the data ...", file=sys.stderr)
        tok = Tokenizer.train(texts_or_files, vocab_size=args.vocab_size, special_tokens=["<|endoftext|>"])
        out.mkdir(parents=True, exist_ok=True)
        tok.save_hf_json(out / "tokenizer.json")
    streams = []
    if texts_or_files:
        docs = [Path(f).read_text(encoding="utf-8") if isinstance(f, Path) else f for f in texts_or_files]
        eot = tok.special_tokens.get("<|endoftext|>")
        for ids in tok.encode_ordinary_batch(docs):
            streams.append(np.asarray(ids + ([eot] if eot is not None else []), dtype=np.int64))
    from .data import TokenShard

    streams += [np.asarray(TokenShard(s).tokens, dtype=np.int64) for s in shards]
    tokens = np.concatenate(streams)
    cut = int(len(tokens) * (1.0 - args.val_fraction))
    train_ids, val_ids = tokens[:cut], tokens[cut:]
    if args.resume:
        model = load_model(out / "model.safetensors")
    elif args.arch == "gpt":
        model = GPT(GPTConfig(vocab_size=tok.n_vocab, block_size=args.seq_len, n_layer=args.n_layer, n_head=args.n_head,
                              n_embd=args.n_embd, dropout=args.dropout, positions=args.positions))
    else:
        model = LSTMLanguageModel(LSTMConfig(vocab_size=tok.n_vocab, n_embd=args.n_embd, hidden_size=args.hidden_size,
                                             num_layers=args.num_layers, dropout=args.dropout, cell=args.cell,
                                             tie_weights=args.n_embd == args.hidden_size))
    cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, grad_accum=args.grad_accum,
                      lr=args.lr, min_lr=args.lr / 10, warmup_steps=min(args.warmup, args.steps // 10 + 1),
                      eval_interval=args.eval_interval, eval_batches=args.eval_batches,
                      checkpoint_interval=args.checkpoint_interval, seed=args.seed)
    print(f"{type(model).__name__}: {sum(p.numel() for p in model.parameters()):,} parameters; "
          f"{len(train_ids):,} training / {len(val_ids):,} validation tokens -> {out}", file=sys.stderr)
    result = train(model, train_ids, val_ids if len(val_ids) > cfg.batch_size * cfg.seq_len else None, cfg, out_dir=out, resume=args.resume)
    if not (out / "tokenizer.json").exists():
        tok.save_hf_json(out / "tokenizer.json")
    last = result.history[-1] if result.history else {}
    speed = sorted(h["tokens_per_s"] for h in result.history[-50:])
    msg = f"step {result.step}: loss {last.get('loss', float('nan')):.4f}"
    if result.evals:
        msg += f", val loss {result.evals[-1]['val_loss']:.4f} (perplexity {result.evals[-1]['val_ppl']:.2f})"
    if speed:
        msg += f", {speed[len(speed) // 2]:,.0f} tokens/s"
    print(msg + f"; checkpoint in {out}" + (" (interrupted; continue with --resume)" if result.interrupted else ""))
    return 130 if result.interrupted else 0


def _cmd_generate(args: argparse.Namespace) -> int:
    from .decoding import generate

    model, tok = _load_ferrolm(Path(args.model), args.tokenizer)
    if tok.n_vocab > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tok.n_vocab} tokens but the model only {model.config.vocab_size}; pass the model's own tokenizer")
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    ids = tok.encode(prompt, allowed_special="all")
    if not ids:
        raise ValueError("the prompt is empty; pass --prompt TEXT")
    eot = tok.special_tokens.get("<|endoftext|>")
    new = generate(model, [ids] * args.num_samples, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p, stop_ids=[eot] if eot is not None else None, seed=args.seed)
    for i, row in enumerate(new):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        print(prompt + tok.decode([t for t in row if t != eot]))
    return 0


def _load_lm_and_tokenizer(path: Path, tokenizer: Optional[str]):
    """A ferrolm checkpoint (folder or .safetensors) or a local Hugging Face model folder."""
    if path.is_dir() and _is_hf_dir(path):  # ferrolm folders keep their config inside the checkpoint
        try:
            from transformers import AutoModelForCausalLM
        except ImportError as e:
            raise ImportError("a Hugging Face model folder needs transformers: pip install transformers") from e
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True).eval()
        tok_file = Path(tokenizer) if tokenizer else path / "tokenizer.json"
        return model, _load_tokenizer(tok_file)
    return _load_ferrolm(path, tokenizer, also=", or a Hugging Face model folder")


def _load_ferrolm(path: Path, tokenizer: Optional[str], also: str = ""):
    """A ferrolm checkpoint (a `ferrolm train` folder or a .safetensors file) and its tokenizer
    (``tokenizer``, else tokenizer.json beside it)."""
    from .models import load_model

    model_file = path / "model.safetensors" if path.is_dir() else path
    if not model_file.is_file():
        raise FileNotFoundError(f"no model checkpoint at {model_file}; pass a folder written by `ferrolm train` or a .safetensors file{also}")
    tok_file = Path(tokenizer) if tokenizer else (path if path.is_dir() else path.parent) / "tokenizer.json"
    return load_model(model_file), _load_tokenizer(tok_file)


def _is_hf_dir(path: Path) -> bool:
    import json as _json

    try:
        return "model_type" in _json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False


def _cmd_icl_eval(args: argparse.Namespace) -> int:
    import json as _json

    from .icl import LM, Template, kshot_sweep, load_examples
    from .icl.tasks import stdlib_package_task

    model, tok = _load_lm_and_tokenizer(Path(args.model), args.tokenizer)
    ks = [int(k) for k in args.k.split(",")]
    seeds = list(range(args.seeds))
    if args.data:
        examples = load_examples(args.data, input_key=args.input_key, output_key=args.output_key)
        if args.label_words:
            words = _json.loads(args.label_words)
        else:
            labels = sorted({str(e.output) for e in examples})
            words = {lab: " " + lab for lab in labels}
        examples = [type(e)(e.input, str(e.output), e.fields) for e in examples]
        def unescape(x: str) -> str:  # shells pass "\\n" literally
            return x.replace("\\n", "\n").replace("\\t", "\t")

        template = Template(demo=unescape(args.demo), query=unescape(args.query), separator=unescape(args.separator),
                            instruction=unescape(args.instruction), label_words=words)
        n_test = max(1, int(len(examples) * args.test_fraction))
        pool, test = examples[:-n_test], examples[-n_test:]
    else:
        pool, test, template = stdlib_package_task()
        print(f"embedded task: standard-library package of a code snippet ({len(template.choices())} classes, "
              f"{len(pool)} pool / {len(test)} test examples)", file=sys.stderr)
    embed = None
    if args.retriever in ("topk", "mmr"):
        from .icl import model_embedder

        embed = model_embedder(model, tok)
    lm = LM(model, batch_size=args.batch_size)
    sweep = kshot_sweep(lm, tok, pool, test, template, ks=ks, seeds=seeds, retriever=args.retriever, embed=embed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = sweep.markdown()
    (out / "icl.md").write_text(table)
    sweep.save_json(out / "icl.json")
    try:
        sweep.plot(out / "icl.png")
    except ImportError:
        print("plot skipped: matplotlib is not installed", file=sys.stderr)
    print(table, end="")
    truncated = sum(r.truncated for r in sweep.runs)
    if truncated:
        print(f"note: {truncated} prompts were longer than the model's window and lost their oldest tokens", file=sys.stderr)
    print(f"wrote {out / 'icl.md'}, {out / 'icl.json'}, {out / 'icl.png'}")
    return 0


def _cmd_icl_experiment(args: argparse.Namespace) -> int:
    from .recipes import icl_science as science

    for res in science.run(args.name, args.results, quick=args.quick, seed=args.seed):
        print(f"## {res['experiment']} ({res['wall_seconds']:.0f} s)\n")
        print(science.markdown(res))
        print(f"wrote {Path(args.results) / ('icl_' + res['experiment'] + '.json')} and .png\n")
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    import numpy as np

    if args.action == "experiment":
        from .recipes.finetune_experiment import run_experiment

        results = run_experiment(args.results, quick=args.quick, seed=args.seed)
        from .recipes.finetune_experiment import markdown

        print(markdown(results), end="")
        print(f"wrote {Path(args.results) / 'finetune.md'}, finetune.json, finetune.png")
        return 0
    if not args.method or not args.model:
        raise ValueError("ferrolm finetune needs --method and --model (or the 'experiment' action)")
    from . import finetune as ft
    from .icl import load_examples
    from .icl.tasks import stdlib_package_task
    from .models import GPT, LSTMLanguageModel, save_model
    from .training import TrainConfig, train

    model, tok = _load_lm_and_tokenizer(Path(args.model), args.tokenizer)
    if not isinstance(model, (GPT, LSTMLanguageModel)):
        raise ValueError("ferrolm finetune takes a ferrolm GPT or LSTM checkpoint (use PEFT for Hugging Face models)")
    # Examples with outputs train as (prompt, target) pairs, the loss on the target only;
    # plain text trains as a token stream.
    pairs = None
    if args.data:
        path = Path(args.data)
        if path.suffix.lower() in (".jsonl", ".csv"):
            examples = load_examples(path, args.input_key, args.output_key)
            if all(e.output is not None for e in examples):
                pairs = list(zip(tok.encode_ordinary_batch([e.input for e in examples]),
                                 tok.encode_ordinary_batch([str(e.output) for e in examples])))
            else:
                texts = [e.input for e in examples]
        else:
            texts = [path.read_text(encoding="utf-8")]
    else:
        from .icl import Example

        pool, _, template = stdlib_package_task()
        pairs = list(zip(tok.encode_ordinary_batch([template.render([], Example(e.input, None, e.fields)) for e in pool]),
                         tok.encode_ordinary_batch([template.label_words[e.output] for e in pool])))  # type: ignore[index]
        print(f"embedded task: {len(pairs)} (prompt, label word) pairs", file=sys.stderr)
    if pairs is None:
        eot = tok.special_tokens.get("<|endoftext|>")
        data: object = np.asarray([t for ids in tok.encode_ordinary_batch(texts) for t in ids + ([eot] if eot is not None else [])], dtype=np.int64)
    else:
        data = pairs
    target: object = model
    if args.method == "lora":
        if isinstance(model, GPT):
            ft.apply_lora(model, r=args.r, alpha=args.alpha, target_modules=args.targets.split(","), dropout=args.lora_dropout)
        else:
            ft.apply_lora_rnn(model.rnn, r=args.r, alpha=args.alpha)
    elif args.method == "prompt":
        target = ft.PromptTuning(model, args.virtual_tokens)
    ft.prepare(target, args.method)  # type: ignore[arg-type]
    ft.print_trainable_parameters(target)  # type: ignore[arg-type]
    block = getattr(model.config, "block_size", None)
    seq_len = min(args.seq_len, block - (args.virtual_tokens if args.method == "prompt" else 0)) if block else args.seq_len
    cfg = TrainConfig(max_steps=args.steps, batch_size=args.batch_size, seq_len=seq_len, lr=args.lr, min_lr=args.lr / 10,
                      warmup_steps=min(20, args.steps // 10), eval_interval=0, checkpoint_interval=args.checkpoint_interval, seed=args.seed)
    out = Path(args.out)
    result = train(target, data, None, cfg, out_dir=out, resume=args.resume)  # type: ignore[arg-type]
    if args.method == "lora" and isinstance(model, GPT):
        ft.save_lora(model, out / "adapter")
        ft.merge_and_unload(model)
    elif args.method == "lora":
        ft.merge_lora_rnn(model.rnn)
    if args.method == "prompt":
        from safetensors.torch import save

        from ._io import atomic_write

        atomic_write(out / "prompt.safetensors", save({"prompt": target.prompt.detach().cpu().contiguous()}))  # type: ignore[union-attr]
    else:
        save_model(model, out / "model.safetensors")
    tok.save_hf_json(out / "tokenizer.json")
    last = result.history[-1]["loss"] if result.history else float("nan")
    print(f"{args.method}: step {result.step}, loss {last:.4f}; wrote {out}" + (" (interrupted; continue with --resume)" if result.interrupted else ""))
    return 130 if result.interrupted else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ferrolm", description="ferrolm: language models on ordinary CPUs")
    sub = p.add_subparsers(dest="command", required=True)

    b = sub.add_parser("bench", help="run the benchmark suite (quick by default) and print ferrolm vs the references")
    b.add_argument("--full", action="store_true", help="the whole grid (slow) instead of the quick set")
    b.add_argument("--json", default=None, help="also write the results to this JSON file")
    b.add_argument("--only", default=None, help="comma-separated areas to run (tokenizer, data, rnn, attention, models, seq2seq, icl, finetune)")
    b.add_argument("--report", default="ferrolm-bench.md", help="Markdown report to write (default ferrolm-bench.md)")
    b.add_argument("--plot", default="ferrolm-bench.png", help="PNG chart of the ratios to write (default ferrolm-bench.png)")
    b.add_argument("--no-report", action="store_true", help="print the table only")
    b.add_argument("--repeats", type=int, default=None, help="timed runs per contender (default 3; 7 with --full)")
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

    tr = sub.add_parser("train", help="train a GPT or LSTM language model (default data: the embedded corpus) or a seq2seq model "
                                      "(default data: the embedded translation task)",
                        description="Trains a model; checkpoints, the tokenizer and model.safetensors go to --out. "
                                    "Ctrl-C saves a checkpoint; --resume continues it exactly. `train seq2seq` also scores the "
                                    "held-out pairs (BLEU, chrF, exact match) into results.json.")
    tr.add_argument("arch", choices=["gpt", "lstm", "seq2seq"], help="model family")
    tr.add_argument("data", nargs="*", help="UTF-8 text files, token shards or folders of them (default: the embedded corpus); "
                                            "for seq2seq one pairs file, TSV or JSONL (default: English -> French number words)")
    tr.add_argument("--out", default=None, help="output folder (default runs/ARCH, runs/seq2seq-MODEL)")
    tr.add_argument("--tokenizer", default=None, help="tokenizer.json / .tiktoken (default: train one on the data)")
    tr.add_argument("--vocab-size", type=int, default=None, help="vocabulary of the tokenizer trained when none is given (LM 4096, seq2seq 512)")
    tr.add_argument("--max-bytes", type=int, default=None, help="use only this much of the embedded corpus")
    tr.add_argument("--steps", type=int, default=None, help="optimizer steps (LM 300, seq2seq 1500)")
    tr.add_argument("--batch-size", type=int, default=None, help="sequences or pairs per step (LM 16, seq2seq 128)")
    tr.add_argument("--seq-len", type=int, default=128)
    tr.add_argument("--grad-accum", type=int, default=1)
    tr.add_argument("--lr", type=float, default=None, help="peak learning rate (LM 1e-3; seq2seq transformer 1e-3, lstm 3e-3)")
    tr.add_argument("--model", default="transformer", choices=["transformer", "lstm"], help="seq2seq: Transformer or LSTM encoder-decoder")
    tr.add_argument("--test", default=None, help="seq2seq: held-out pairs file (default: the last 5%% of the data)")
    tr.add_argument("--ff-size", type=int, default=None, help="seq2seq transformer feed-forward width")
    tr.add_argument("--beam", type=int, default=4, help="seq2seq: beam size of the test decoding, besides greedy")
    tr.add_argument("--warmup", type=int, default=50)
    tr.add_argument("--dropout", type=float, default=None, help="LM 0.0, seq2seq 0.1")
    tr.add_argument("--n-layer", type=int, default=None, help="GPT layers (4), seq2seq transformer layers per side (3)")
    tr.add_argument("--n-head", type=int, default=None, help="GPT / seq2seq transformer heads (4)")
    tr.add_argument("--n-embd", type=int, default=None, help="embedding width (256)")
    tr.add_argument("--positions", default="learned", choices=["learned", "sinusoidal", "rotary"], help="GPT positions")
    tr.add_argument("--hidden-size", type=int, default=None, help="LSTM width (512)")
    tr.add_argument("--num-layers", type=int, default=None, help="LSTM layers (2)")
    tr.add_argument("--cell", default="lstm", choices=["lstm", "gru"], help="recurrent cell of the lstm family")
    tr.add_argument("--val-fraction", type=float, default=0.05, help="the tail of the data held out for evaluation")
    tr.add_argument("--eval-interval", type=int, default=100)
    tr.add_argument("--eval-batches", type=int, default=10)
    tr.add_argument("--checkpoint-interval", type=int, default=100)
    tr.add_argument("--seed", type=int, default=1337)
    tr.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    tr.set_defaults(func=_cmd_train)

    tl = sub.add_parser("translate", help="translate texts with a model from `ferrolm train seq2seq`")
    tl.add_argument("text", nargs="*", help="texts to translate (default: one per line on stdin)")
    tl.add_argument("--model", required=True, help="a folder from `ferrolm train seq2seq` or its model.safetensors")
    tl.add_argument("--tokenizer", default=None, help="tokenizer file (default: tokenizer.json next to the model)")
    tl.add_argument("--beam", type=int, default=1, help="beam size (1 = greedy)")
    tl.add_argument("--max-new-tokens", type=int, default=None, help="longest output in tokens (default: the model's max_len)")
    tl.set_defaults(func=_cmd_translate)

    g = sub.add_parser("generate", help="continue a prompt with a trained model")
    g.add_argument("model", help="a folder from `ferrolm train` or a .safetensors checkpoint")
    g.add_argument("--prompt", default=None, help="the prompt text (default: stdin)")
    g.add_argument("--tokenizer", default=None, help="tokenizer file (default: tokenizer.json next to the model)")
    g.add_argument("--max-new-tokens", type=int, default=100)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=int, default=None)
    g.add_argument("--top-p", type=float, default=None)
    g.add_argument("--num-samples", type=int, default=1)
    g.add_argument("--seed", type=int, default=None)
    g.set_defaults(func=_cmd_generate)

    ic = sub.add_parser("icl", help="in-context learning evaluation")
    isub = ic.add_subparsers(dest="icl_command", required=True)
    ev = isub.add_parser("eval", help="k-shot classification accuracy over k and seeds (default: the embedded task)")
    ev.add_argument("--model", required=True, help="a `ferrolm train` folder, a .safetensors checkpoint or a Hugging Face model folder")
    ev.add_argument("--tokenizer", default=None, help="tokenizer file (default: tokenizer.json next to the model)")
    ev.add_argument("--data", default=None, help="JSONL or CSV with input and label/output fields (default: the embedded task)")
    ev.add_argument("--input-key", default="input")
    ev.add_argument("--output-key", default=None)
    ev.add_argument("--demo", default="{input}\nAnswer:{label}", help="demonstration template")
    ev.add_argument("--query", default="{input}\nAnswer:", help="query template")
    ev.add_argument("--separator", default="\n\n", help="between demonstrations (\\n and \\t are unescaped in all templates)")
    ev.add_argument("--instruction", default="")
    ev.add_argument("--label-words", default=None, help='JSON object label -> word, e.g. \'{"0": " no", "1": " yes"}\'')
    ev.add_argument("--test-fraction", type=float, default=0.2, help="the tail of --data used as queries")
    ev.add_argument("--retriever", default="random", choices=["random", "fixed", "bm25", "topk", "mmr"])
    ev.add_argument("--k", default="0,1,2,4,8", help="comma-separated demonstration counts")
    ev.add_argument("--seeds", type=int, default=3)
    ev.add_argument("--batch-size", type=int, default=16)
    ev.add_argument("--out", default="icl-results", help="folder for icl.md, icl.json and icl.png")
    ev.set_defaults(func=_cmd_icl_eval)
    ex = isub.add_parser("experiment", help="the ICL science suite: train small models and reproduce an ICL result (GPT vs LSTM)",
                         description="Experiments: regression (in-context linear regression, Garg et al. 2022), "
                                     "recall (multi-query associative recall, Arora et al. 2023), induction (induction heads, Olsson et al. 2022), fewshot (arbitrary-label few-shot classification, bursty vs uniform data, in the spirit of Chan et al. 2022), or all. Writes icl_NAME.json "
                                     "and icl_NAME.png into --results and prints a table.")
    ex.add_argument("name", help="regression, recall, induction, fewshot or all")
    ex.add_argument("--quick", action="store_true", help="reduced sizes: every experiment in a few minutes (a smoke check)")
    ex.add_argument("--results", default="docs/results", help="output folder")
    ex.add_argument("--seed", type=int, default=0)
    ex.set_defaults(func=_cmd_icl_experiment)

    f = sub.add_parser("finetune", help="lightweight fine-tuning of a ferrolm model (LoRA, BitFit, prompt tuning, head-only, full)",
                       description="Fine-tunes a ferrolm checkpoint on text (default: the embedded ICL task rendered as text). "
                                   "Writes model.safetensors (LoRA merged) and, for LoRA on a GPT, adapter/ in PEFT's layout.")
    f.add_argument("action", nargs="?", default="run", choices=["run", "experiment"],
                   help="run: fine-tune --model with --method; experiment: the comparison of every method and ICL on the embedded task")
    f.add_argument("--method", default=None, choices=["lora", "bitfit", "prompt", "head", "full"])
    f.add_argument("--model", default=None, help="a `ferrolm train` folder or a .safetensors checkpoint")
    f.add_argument("--results", default="docs/results", help="experiment: output folder for finetune.md/.json/.png")
    f.add_argument("--quick", action="store_true", help="experiment: tiny sizes (a smoke run)")
    f.add_argument("--tokenizer", default=None)
    f.add_argument("--data", default=None, help="JSONL/CSV examples (with outputs: trained as prompt -> output, the loss on the output only; inputs alone: as text) or a text file (default: the embedded task)")
    f.add_argument("--input-key", default="input")
    f.add_argument("--output-key", default=None)
    f.add_argument("--out", default="runs/finetune")
    f.add_argument("--steps", type=int, default=200)
    f.add_argument("--batch-size", type=int, default=8)
    f.add_argument("--seq-len", type=int, default=128)
    f.add_argument("--lr", type=float, default=1e-3)
    f.add_argument("--r", type=int, default=8, help="LoRA rank")
    f.add_argument("--alpha", type=float, default=16.0, help="LoRA alpha")
    f.add_argument("--lora-dropout", type=float, default=0.0)
    f.add_argument("--targets", default="c_attn,c_proj,c_fc", help="LoRA target modules of a GPT (comma-separated)")
    f.add_argument("--virtual-tokens", type=int, default=16, help="prompt tuning: virtual tokens")
    f.add_argument("--checkpoint-interval", type=int, default=100)
    f.add_argument("--seed", type=int, default=1337)
    f.add_argument("--resume", action="store_true")
    f.set_defaults(func=_cmd_finetune)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    """Runs the command; a bad argument, file or value prints one line (no traceback) and
    returns 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("ferrolm: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, KeyError, OSError, ImportError) as e:
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        print(f"ferrolm: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
