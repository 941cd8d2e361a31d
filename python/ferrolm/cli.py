"""The ``ferrolm`` command (also ``python -m ferrolm``): it only parses arguments and calls the
library and recipe functions (:mod:`ferrolm.recipes`); a bad argument, file or value prints
one ``ferrolm: error:`` line and exits 2, and a command that needs a missing optional
dependency (PyTorch) says which one."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path
from typing import Callable, List, Optional


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: an int >= ``minimum`` (so a count that would make the command do
    nothing, or a negative one, is refused before any work)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int, got {text!r}") from None
        if value < minimum:
            what = "a positive int" if minimum == 1 else f"an int >= {minimum}"
            raise argparse.ArgumentTypeError(f"must be {what}, got {value}")
        return value

    parse.__name__ = "int"
    return parse


_positive = _int_at_least(1)
_count = _int_at_least(0)


def _float_in(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite float in the interval (NaN and infinities refused)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        inside = (value > lo if lo_open else value >= lo) and (value < hi if hi_open else value <= hi)
        if not (math.isfinite(value) and inside):
            interval = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
            raise argparse.ArgumentTypeError(f"must be a finite number in {interval}, got {text}")
        return value

    parse.__name__ = "float"
    return parse


_temperature = _float_in(0.0, math.inf, hi_open=True)
_fraction = _float_in(0.0, 1.0, hi_open=True)
_lr = _float_in(0.0, math.inf, lo_open=True, hi_open=True)
_top_p = _float_in(0.0, 1.0, lo_open=True)
_test_fraction = _float_in(0.0, 1.0, lo_open=True, hi_open=True)


def _k_list(text: str) -> List[int]:
    """``--k``: comma-separated demonstration counts (ints >= 0)."""
    try:
        ks = [int(k) for k in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints such as 0,1,4, got {text!r}") from None
    if any(k < 0 for k in ks):
        raise argparse.ArgumentTypeError(f"demonstration counts must be >= 0, got {text}")
    return ks


def _label_words(text: str) -> str:
    """``--label-words``: checked to be a JSON object of label -> word strings (returned as given)."""
    import json

    try:
        words = json.loads(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e}): {text!r}") from None
    if not isinstance(words, dict) or not words or not all(isinstance(w, str) for w in words.values()):
        raise argparse.ArgumentTypeError(f'expected a JSON object label -> word such as {{"0": " no"}}, got {text!r}')
    return text


class _Parser(argparse.ArgumentParser):
    """Bad arguments are one ``ferrolm: error:`` line (with where to find the usage)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"ferrolm: error: {self.prog}: {message} (see {self.prog} --help)\n")


def _cmd_bench(args: argparse.Namespace) -> int:
    from .bench import AREAS, run_benchmarks

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


def _interrupted(flag: bool) -> str:
    return " (interrupted; continue with --resume)" if flag else ""


def _cmd_train_seq2seq(args: argparse.Namespace) -> int:
    from .recipes.translation import number_task, pairs_task, train_seq2seq
    from .tokenizer import Tokenizer

    if args.data and len(args.data) != 1:
        raise ValueError("seq2seq training takes one pairs file (TSV: source<TAB>target, or JSONL with source/target)")
    task = pairs_task(args.data[0], args.test) if args.data else number_task(seed=args.seed)
    out = Path(args.out or f"runs/seq2seq-{args.model}")
    if args.model == "transformer":
        sizes = dict(
            dropout=args.dropout, n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd, ff_size=args.ff_size
        )
    else:
        sizes = dict(dropout=args.dropout, n_embd=args.n_embd, hidden_size=args.hidden_size, num_layers=args.num_layers)
    print(
        f"{task.description}: {len(task.train):,} training / {len(task.valid):,} validation / {len(task.test):,} test "
        f"pairs -> {out}",
        file=sys.stderr,
    )
    tok = Tokenizer.from_file(args.tokenizer) if args.tokenizer else None
    res = train_seq2seq(
        args.model,
        task,
        out,
        steps=args.steps or 1500,
        batch_size=args.batch_size or 128,
        lr=args.lr,
        vocab_size=args.vocab_size or 512,
        seed=args.seed,
        resume=args.resume,
        beam_size=args.beam,
        checkpoint_interval=args.checkpoint_interval,
        tokenizer=tok,
        **sizes,
    )
    for name, r in res["test"].items():
        print(
            f"{name}: BLEU {r['bleu']:.2f}, chrF {r['chrf']:.2f}, exact match {r['exact_match']:.3f} on {r['n']} "
            f"held-out pairs ({r['sentences_per_s']:.0f} sentences/s)"
        )
    print(
        f"{res['parameters']:,} parameters, {res['steps']} steps in {res['train_seconds']:.0f} s; results in "
        f"{out / 'results.json'}" + _interrupted(res["interrupted"])
    )
    return 130 if res["interrupted"] else 0


def _cmd_translate(args: argparse.Namespace) -> int:
    from .models import load_model
    from .recipes.translation import translate_texts
    from .tokenizer import Tokenizer

    path = Path(args.model)
    ckpt = path / "model.safetensors" if path.is_dir() else path
    if not ckpt.is_file():
        raise FileNotFoundError(
            f"no model at {ckpt}; pass a folder from `ferrolm train seq2seq` or its model.safetensors"
        )
    model = load_model(ckpt)
    if not getattr(model, "is_encoder_decoder", False):
        raise ValueError(
            f"{ckpt} holds a {type(model).__name__}, not a seq2seq model (train one with `ferrolm train seq2seq`)"
        )
    tok = Tokenizer.from_file(Path(args.tokenizer) if args.tokenizer else ckpt.parent / "tokenizer.json")
    texts = args.text or [line.rstrip("\n") for line in sys.stdin]
    todo = [t for t in texts if t.strip()]
    if not todo:
        raise ValueError("nothing to translate: pass the text as an argument or on stdin")
    outs = iter(translate_texts(model, tok, todo, beam_size=args.beam, max_new_tokens=args.max_new_tokens))
    for text in texts:  # a blank input line stays a blank output line, so the lines still match
        print(next(outs) if text.strip() else "")
    return 0


#: ``ferrolm train gpt|lstm`` defaults of the options whose seq2seq default differs (None in the parser).
_LM_DEFAULTS = {
    "steps": 300,
    "batch_size": 16,
    "lr": 1e-3,
    "vocab_size": 4096,
    "dropout": 0.0,
    "n_layer": 4,
    "n_head": 4,
    "n_embd": 256,
    "hidden_size": 512,
    "num_layers": 2,
}


def _cmd_train(args: argparse.Namespace) -> int:
    from .recipes.language_model import LMOptions, train_language_model

    if args.arch == "seq2seq":
        return _cmd_train_seq2seq(args)
    given = {k: (v if v is not None else _LM_DEFAULTS[k]) for k, v in vars(args).items() if k in _LM_DEFAULTS}
    fields = (
        "seq_len",
        "grad_accum",
        "warmup",
        "positions",
        "cell",
        "val_fraction",
        "eval_interval",
        "eval_batches",
        "checkpoint_interval",
        "seed",
        "max_bytes",
    )
    options = LMOptions(**given, **{k: getattr(args, k) for k in fields})
    out = Path(args.out or f"runs/{args.arch}")
    _, result = train_language_model(args.arch, args.data, out, options, tokenizer=args.tokenizer, resume=args.resume)
    last = result.history[-1] if result.history else {}
    speed = sorted(h["tokens_per_s"] for h in result.history[-50:])
    msg = f"step {result.step}: loss {last.get('loss', float('nan')):.4f}"
    if result.evals:
        msg += f", val loss {result.evals[-1]['val_loss']:.4f} (perplexity {result.evals[-1]['val_ppl']:.2f})"
    if speed:
        msg += f", {speed[len(speed) // 2]:,.0f} tokens/s"
    print(msg + f"; checkpoint in {out}" + _interrupted(result.interrupted))
    return 130 if result.interrupted else 0


def _model_arg(args: argparse.Namespace) -> str:
    model = getattr(args, "model_opt", None) or args.model
    if getattr(args, "model_opt", None) and args.model and args.model != args.model_opt:
        raise ValueError(f"two models given: {args.model!r} and --model {args.model_opt!r}; pass one")
    if not model:
        raise ValueError("no model: pass --model smollm2, a .gguf file, a Hugging Face Llama folder or a checkpoint")
    return model


def _causal(model, name: str) -> None:
    """Refuses an encoder-decoder model where a causal language model is needed."""
    if getattr(model, "is_encoder_decoder", False):
        raise ValueError(
            f"{name} holds a {type(model).__name__} (encoder-decoder), not a language model; "
            "use `ferrolm translate --model` for it"
        )


def _cmd_generate(args: argparse.Namespace) -> int:
    from .decoding import generate
    from .recipes.language_model import cut_at_stop_strings, load_lm, stop_ids_of

    model, tok = load_lm(_model_arg(args), args.tokenizer, transformers_ok=False, layers=args.layers)
    _causal(model, _model_arg(args))
    if tok.n_vocab > model.config.vocab_size:
        raise ValueError(
            f"the tokenizer has {tok.n_vocab} tokens but the model only {model.config.vocab_size}; "
            "pass the model's own tokenizer"
        )
    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    ids = tok.encode(prompt, allowed_special="all")
    if not ids:
        raise ValueError("the prompt is empty; pass --prompt TEXT")
    stops = stop_ids_of(tok)
    new = generate(
        model,
        [ids] * args.num_samples,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        stop_ids=stops or None,
        seed=args.seed,
        truncate=args.truncate,
    )
    window = model.context_window
    if args.truncate and window is not None and len(ids) + args.max_new_tokens > window:
        cut = len(ids) + args.max_new_tokens - window
        print(f"note: the prompt lost its first {cut} tokens to fit the window of {window}", file=sys.stderr)
    for i, row in enumerate(new):
        if args.num_samples > 1:
            print(f"--- sample {i + 1}")
        text, _ = cut_at_stop_strings(tok.decode([t for t in row if t not in stops]), args.stop or [])
        print(prompt + text)
    return 0


def _stdin_lines():
    """User turns: lines typed at a "> " prompt (or piped in), until end of input."""
    while True:
        try:
            yield input("> " if sys.stdin.isatty() else "")
        except EOFError:
            return


def _cmd_chat(args: argparse.Namespace) -> int:
    from .recipes.language_model import chat, load_lm

    model, tok = load_lm(args.model, args.tokenizer, transformers_ok=False, layers=args.layers)

    def write(text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()

    try:
        chat(
            model,
            tok,
            _stdin_lines(),
            write,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            system=args.system,
        )
    except KeyboardInterrupt:
        write("\n")
    return 0


def _cmd_icl_eval(args: argparse.Namespace) -> int:
    import json

    from .icl import LM, kshot_sweep, model_embedder
    from .recipes.language_model import icl_task, load_lm

    if args.task is not None:
        return _cmd_icl_eval_tasks(args)
    model, tok = load_lm(args.model, args.tokenizer, layers=args.layers)
    _causal(model, args.model)
    pool, test, template = icl_task(
        args.data,
        args.input_key,
        args.output_key,
        args.demo,
        args.query,
        args.separator,
        args.instruction,
        json.loads(args.label_words) if args.label_words else None,
        args.test_fraction,
    )
    embed = model_embedder(model, tok) if args.retriever in ("topk", "mmr", "votek") else None
    sweep = kshot_sweep(
        LM(model, batch_size=args.batch_size),
        tok,
        pool,
        test,
        template,
        ks=args.k,
        seeds=list(range(args.seeds)),
        retriever=args.retriever,
        embed=embed,
        calibrate=args.calibrate,
    )
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
        print(
            f"note: {truncated} prompts were longer than the model's window and lost their oldest tokens",
            file=sys.stderr,
        )
    print(f"wrote {out / 'icl.md'}, {out / 'icl.json'}, {out / 'icl.png'}")
    return 0


def _cmd_icl_eval_tasks(args: argparse.Namespace) -> int:
    from .icl import LM, model_embedder
    from .recipes.icl_tasks import resolve_tasks, run_suite, suite_markdown
    from .recipes.language_model import load_lm

    if args.data is not None:
        raise ValueError("give --task (the built-in suite) or --data (your own examples), not both")
    names = resolve_tasks(args.task)  # before loading the model: a wrong name fails at once
    model, tok = load_lm(args.model, args.tokenizer, layers=args.layers)
    embed = model_embedder(model, tok) if args.retriever in ("topk", "mmr", "votek") else None
    res = run_suite(
        LM(model, tok, batch_size=args.batch_size),
        tok,
        names,
        ks=list(args.k),
        seeds=list(range(args.seeds)),
        n_test=args.n_test,
        retriever=args.retriever,
        embed=embed,
        calibrate=args.calibrate,
        out_dir=args.out,
        model_name=str(args.model),
    )
    print(suite_markdown(res), end="")
    out = Path(args.out)
    print(f"wrote {out / 'icl_tasks.md'}, {out / 'icl_tasks.json'}, {out / 'icl_tasks.png'}")
    return 0


def _cmd_icl_experiment(args: argparse.Namespace) -> int:
    from .recipes import icl_effects as effects
    from .recipes import icl_science as science

    if args.name in effects.EFFECTS:
        from .recipes.icl_tasks import resolve_tasks
        from .recipes.language_model import load_lm

        tasks = resolve_tasks(args.tasks) if args.tasks else None
        cfg = effects.EffectConfig.quick(tasks) if args.quick else effects.EffectConfig()
        if tasks and not args.quick:
            cfg = dataclasses.replace(cfg, tasks=tuple(tasks))
        name = args.model or "smollm2"
        model, tok = load_lm(name, args.tokenizer, layers=args.layers)
        res = effects.run_effect(args.name, model, tok, cfg, args.results, model_name=name)
        print(f"## {args.name} ({res['wall_seconds']:.0f} s)\n")
        print(effects.markdown(res))
        print(f"wrote {Path(args.results) / ('icl_' + args.name + '.json')}, .md and .png")
        return 0
    if args.name != "all" and args.name not in science.EXPERIMENTS:
        names = ", ".join([*science.EXPERIMENTS, *effects.EFFECTS])
        raise ValueError(f"unknown experiment {args.name!r}; choose from {names} or 'all'")
    if args.model or args.tasks:
        raise ValueError(
            f"--model and --tasks go with {', '.join(effects.EFFECTS)}; {args.name!r} trains its own models"
        )
    for res in science.run(args.name, args.results, quick=args.quick, seed=args.seed):
        print(f"## {res['experiment']} ({res['wall_seconds']:.0f} s)\n")
        print(science.markdown(res))
        print(f"wrote {Path(args.results) / ('icl_' + res['experiment'] + '.json')} and .png\n")
    return 0


def _cmd_finetune(args: argparse.Namespace) -> int:
    if args.action == "experiment" and args.merge:
        from .recipes import icl_vs_finetune as exp

        if not args.out:
            raise ValueError("--merge needs --out, the folder the joined results go to")
        paths = [Path(d) / exp.RESULTS_FILE for d in args.merge]
        missing = [str(p) for p in paths if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"--merge: {', '.join(missing)} missing (give folders holding {exp.RESULTS_FILE})")
        data = exp.merge_results([exp.read_results(p) for p in paths], names=[str(p) for p in paths])
        exp.write_results(data, args.out)
        print(exp.markdown(data), end="")
        print(f"wrote {Path(args.out) / exp.RESULTS_FILE}, icl_vs_finetune.md, icl_vs_finetune.png")
        return 0
    if args.action == "experiment" and args.model:
        from .recipes import icl_vs_finetune as exp
        from .recipes.icl_tasks import resolve_tasks
        from .recipes.language_model import load_lm, load_quantized

        tasks = resolve_tasks(args.tasks) if args.tasks else None
        cfg = exp.ExperimentConfig.quick(tasks) if args.quick else exp.ExperimentConfig()
        if tasks and not args.quick:
            cfg = dataclasses.replace(cfg, tasks=tuple(tasks))
        model, tok = load_lm(args.model, args.tokenizer, layers=args.layers, dequantize=True)
        # LoRA on the quantized base uses the file's own blocks when it has them (else q8_0 of the float model)
        quantized = load_quantized(args.model, layers=args.layers)
        out = Path(args.out or args.results)
        data = exp.run_experiment(model, tok, cfg, out, quantized=quantized, model_name=args.model)
        print(exp.markdown(data), end="")
        print(f"wrote {out / exp.RESULTS_FILE}, icl_vs_finetune.md, icl_vs_finetune.png")
        return 0
    if args.action == "experiment":
        from .recipes.finetune_experiment import markdown, run_experiment

        results = run_experiment(args.out or args.results, quick=args.quick, seed=args.seed)
        print(markdown(results), end="")
        print(f"wrote {Path(args.out or args.results) / 'finetune.md'}, finetune.json, finetune.png")
        return 0
    if not args.method or not args.model:
        raise ValueError("ferrolm finetune needs --method and --model (or the 'experiment' action)")
    from .recipes.language_model import finetune_data, finetune_model, load_lm

    # LoRA and (IA)³ train on the quantized base as the file stores it (QLoRA); the other
    # methods change base weights or read the head's, so they get the float model.
    model, tok = load_lm(args.model, args.tokenizer, layers=args.layers, dequantize=args.method not in ("lora", "ia3"))
    data = finetune_data(tok, args.data, args.input_key, args.output_key)
    result = finetune_model(
        model,
        tok,
        args.method,
        data,
        args.out or "runs/finetune",
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        lr=args.lr,
        r=args.r,
        alpha=args.alpha,
        lora_dropout=args.lora_dropout,
        targets=args.targets.split(",") if args.targets else None,
        virtual_tokens=args.virtual_tokens,
        checkpoint_interval=args.checkpoint_interval,
        seed=args.seed,
        resume=args.resume,
    )
    last = result.history[-1]["loss"] if result.history else float("nan")
    out = args.out or "runs/finetune"
    print(f"{args.method}: step {result.step}, loss {last:.4f}; wrote {out}" + _interrupted(result.interrupted))
    return 130 if result.interrupted else 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = _Parser(prog="ferrolm", description="ferrolm: language models on ordinary CPUs")
    p.add_argument("--version", action="version", version=f"ferrolm {__version__}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    b = sub.add_parser("bench", help="run the benchmark suite (quick by default) and print ferrolm vs the references")
    b.add_argument("--full", action="store_true", help="the whole grid (slow) instead of the quick set")
    b.add_argument("--json", default=None, help="also write the results to this JSON file")
    b.add_argument(
        "--only",
        default=None,
        help="comma-separated areas to run (tokenizer, data, rnn, attention, models, seq2seq, icl, finetune, llama, "
        "quant)",
    )
    b.add_argument("--report", default="ferrolm-bench.md", help="Markdown report to write (default ferrolm-bench.md)")
    b.add_argument(
        "--plot", default="ferrolm-bench.png", help="PNG chart of the ratios to write (default ferrolm-bench.png)"
    )
    b.add_argument("--no-report", action="store_true", help="print the table only")
    b.add_argument(
        "--repeats", type=_positive, default=None, help="timed runs per contender (default 3; 7 with --full)"
    )
    b.set_defaults(func=_cmd_bench)

    t = sub.add_parser("tokenizer", help="train or use a tokenizer")
    tsub = t.add_subparsers(dest="tokenizer_command", required=True, parser_class=_Parser)
    tr = tsub.add_parser("train", help="train a byte-level BPE tokenizer (default: on the embedded corpus)")
    tr.add_argument("files", nargs="*", help="UTF-8 text files (default: the embedded corpus)")
    tr.add_argument("--vocab-size", type=_positive, default=8192)
    tr.add_argument("--min-frequency", type=_count, default=2)
    tr.add_argument("--special", action="append", help="a special token (repeatable; default <|endoftext|>)")
    tr.add_argument("--pattern", default=None, help="pre-tokenizer regex or name (gpt2, cl100k_base)")
    tr.add_argument("--max-bytes", type=_positive, default=None, help="use only this much of the embedded corpus")
    tr.add_argument("--num-threads", type=_positive, default=None)
    tr.add_argument("--out", default="tokenizer.json", help="output file: .json (HF) or .tiktoken")
    tr.set_defaults(func=_cmd_tokenizer_train)
    en = tsub.add_parser("encode", help="print the ids of a text (or stdin)")
    en.add_argument("tokenizer", help="tokenizer.json or .tiktoken file")
    en.add_argument("text", nargs="?", default=None)
    en.add_argument("--pattern", default=None, help="pattern for .tiktoken files (default gpt2)")
    en.set_defaults(func=_cmd_tokenizer_encode)

    tr = sub.add_parser(
        "train",
        help="train a GPT or LSTM language model (default data: the embedded corpus) or a seq2seq model "
        "(default data: the embedded translation task)",
        description="Trains a model; checkpoints, the tokenizer and model.safetensors go to --out. "
        "Ctrl-C saves a checkpoint; --resume continues it exactly. `train seq2seq` also scores the "
        "held-out pairs (BLEU, chrF, exact match) into results.json.",
    )
    tr.add_argument("arch", choices=["gpt", "lstm", "seq2seq"], help="model family")
    tr.add_argument(
        "data",
        nargs="*",
        help="UTF-8 text files, token shards or folders of them (default: the embedded corpus); "
        "for seq2seq one pairs file, TSV or JSONL (default: English -> French number words)",
    )
    tr.add_argument("--out", default=None, help="output folder (default runs/ARCH, runs/seq2seq-MODEL)")
    tr.add_argument("--tokenizer", default=None, help="tokenizer.json / .tiktoken (default: train one on the data)")
    tr.add_argument(
        "--vocab-size",
        type=_positive,
        default=None,
        help="vocabulary of the tokenizer trained when none is given (LM 4096, seq2seq 512)",
    )
    tr.add_argument("--max-bytes", type=_positive, default=None, help="use only this much of the embedded corpus")
    tr.add_argument("--steps", type=_positive, default=None, help="optimizer steps (LM 300, seq2seq 1500)")
    tr.add_argument(
        "--batch-size", type=_positive, default=None, help="sequences or pairs per step (LM 16, seq2seq 128)"
    )
    tr.add_argument("--seq-len", type=_positive, default=128)
    tr.add_argument("--grad-accum", type=_positive, default=1)
    tr.add_argument(
        "--lr", type=_lr, default=None, help="peak learning rate (LM 1e-3; seq2seq transformer 1e-3, lstm 3e-3)"
    )
    tr.add_argument(
        "--model",
        default="transformer",
        choices=["transformer", "lstm"],
        help="seq2seq: Transformer or LSTM encoder-decoder",
    )
    tr.add_argument("--test", default=None, help="seq2seq: held-out pairs file (default: the last 5%% of the data)")
    tr.add_argument("--ff-size", type=_positive, default=None, help="seq2seq transformer feed-forward width")
    tr.add_argument("--beam", type=_positive, default=4, help="seq2seq: beam size of the test decoding, besides greedy")
    tr.add_argument("--warmup", type=_count, default=50)
    tr.add_argument("--dropout", type=_fraction, default=None, help="LM 0.0, seq2seq 0.1")
    tr.add_argument(
        "--n-layer", type=_positive, default=None, help="GPT layers (4), seq2seq transformer layers per side (3)"
    )
    tr.add_argument("--n-head", type=_positive, default=None, help="GPT / seq2seq transformer heads (4)")
    tr.add_argument("--n-embd", type=_positive, default=None, help="embedding width (256)")
    tr.add_argument("--positions", default="learned", choices=["learned", "sinusoidal", "rotary"], help="GPT positions")
    tr.add_argument("--hidden-size", type=_positive, default=None, help="LSTM width (512)")
    tr.add_argument("--num-layers", type=_positive, default=None, help="LSTM layers (2)")
    tr.add_argument("--cell", default="lstm", choices=["lstm", "gru"], help="recurrent cell of the lstm family")
    tr.add_argument("--val-fraction", type=_fraction, default=0.05, help="the tail of the data held out for evaluation")
    tr.add_argument("--eval-interval", type=_count, default=100)
    tr.add_argument("--eval-batches", type=_positive, default=10)
    tr.add_argument("--checkpoint-interval", type=_count, default=100)
    tr.add_argument("--seed", type=int, default=1337)
    tr.add_argument("--resume", action="store_true", help="continue the checkpoint in --out")
    tr.set_defaults(func=_cmd_train)

    tl = sub.add_parser("translate", help="translate texts with a model from `ferrolm train seq2seq`")
    tl.add_argument("text", nargs="*", help="texts to translate (default: one per line on stdin)")
    tl.add_argument("--model", required=True, help="a folder from `ferrolm train seq2seq` or its model.safetensors")
    tl.add_argument("--tokenizer", default=None, help="tokenizer file (default: tokenizer.json next to the model)")
    tl.add_argument("--beam", type=_positive, default=1, help="beam size (1 = greedy)")
    tl.add_argument(
        "--max-new-tokens", type=_positive, default=None, help="longest output in tokens (default: the model's max_len)"
    )
    tl.set_defaults(func=_cmd_translate)

    g = sub.add_parser("generate", help="continue a prompt with a model (smollm2, a .gguf, a checkpoint)")
    g.add_argument("model", nargs="?", default=None, help="a folder from `ferrolm train` or a .safetensors checkpoint")
    g.add_argument(
        "--model",
        dest="model_opt",
        default=None,
        help="smollm2 (the embedded SmolLM2-135M-Instruct), a .gguf file, a Hugging Face Llama folder or a checkpoint",
    )
    g.add_argument("--prompt", default=None, help="the prompt text (default: stdin)")
    g.add_argument("--tokenizer", default=None, help="tokenizer file (default: the model's own)")
    g.add_argument("--max-new-tokens", type=_positive, default=100)
    g.add_argument("--temperature", type=_temperature, default=0.8, help="0 = greedy")
    g.add_argument("--top-k", type=_positive, default=None)
    g.add_argument("--top-p", type=_top_p, default=None)
    g.add_argument("--stop", action="append", default=None, help="cut the text at this string (repeatable)")
    g.add_argument("--num-samples", type=_positive, default=1)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument(
        "--truncate", action="store_true", help="cut a prompt too long for the window from the left instead of failing"
    )
    g.add_argument("--layers", type=_positive, default=None, help=argparse.SUPPRESS)  # tests: the first N layers
    g.set_defaults(func=_cmd_generate)

    c = sub.add_parser(
        "chat",
        help="chat with a model in the terminal (its chat template; Ctrl-D or Ctrl-C to leave)",
        description="Each line is a user turn; the reply streams as it is generated and ends at the model's "
        "end-of-turn token. The conversation is kept for the next turn.",
    )
    c.add_argument("--model", required=True, help="smollm2, a .gguf file or a Hugging Face Llama folder")
    c.add_argument("--tokenizer", default=None, help="tokenizer file (default: the model's own)")
    c.add_argument("--system", default=None, help="a system message to start the conversation")
    c.add_argument("--max-new-tokens", type=_positive, default=256, help="longest reply in tokens")
    c.add_argument("--temperature", type=_temperature, default=0.0, help="0 = greedy (default)")
    c.add_argument("--top-k", type=_positive, default=None)
    c.add_argument("--top-p", type=_top_p, default=None)
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--layers", type=_positive, default=None, help=argparse.SUPPRESS)
    c.set_defaults(func=_cmd_chat)

    ic = sub.add_parser("icl", help="in-context learning evaluation")
    isub = ic.add_subparsers(dest="icl_command", required=True, parser_class=_Parser)
    ev = isub.add_parser("eval", help="k-shot classification accuracy over k and seeds (default: the embedded task)")
    ev.add_argument(
        "--model",
        required=True,
        help="smollm2, a .gguf file, a `ferrolm train` folder, a .safetensors checkpoint or a Hugging Face model "
        "folder",
    )
    ev.add_argument("--layers", type=_positive, default=None, help=argparse.SUPPRESS)
    ev.add_argument("--tokenizer", default=None, help="tokenizer file (default: tokenizer.json next to the model)")
    ev.add_argument(
        "--data", default=None, help="JSONL or CSV with input and label/output fields (default: the embedded task)"
    )
    ev.add_argument(
        "--task",
        default=None,
        help="a task of the built-in suite (ferrolm.icl.tasks: number_french, country_currency, plural, ...), "
        "a comma-separated list, or all; writes icl_tasks.md/.json/.png",
    )
    ev.add_argument("--n-test", type=int, default=100, help="test examples per --task (a fixed split)")
    ev.add_argument(
        "--calibrate",
        action="store_true",
        help="contextual calibration of classification (Zhao et al. 2021: content-free inputs N/A, '', [MASK])",
    )
    ev.add_argument("--input-key", default="input")
    ev.add_argument("--output-key", default=None)
    ev.add_argument("--demo", default="{input}\nAnswer:{label}", help="demonstration template")
    ev.add_argument("--query", default="{input}\nAnswer:", help="query template")
    ev.add_argument(
        "--separator", default="\n\n", help="between demonstrations (\\n and \\t are unescaped in all templates)"
    )
    ev.add_argument("--instruction", default="")
    ev.add_argument(
        "--label-words",
        type=_label_words,
        default=None,
        help='JSON object label -> word, e.g. \'{"0": " no", "1": " yes"}\'',
    )
    ev.add_argument("--test-fraction", type=_test_fraction, default=0.2, help="the tail of --data used as queries")
    ev.add_argument("--retriever", default="random", choices=["random", "fixed", "bm25", "topk", "mmr", "votek"])
    ev.add_argument("--k", type=_k_list, default="0,1,2,4,8", help="comma-separated demonstration counts")
    ev.add_argument("--seeds", type=_positive, default=3)
    ev.add_argument("--batch-size", type=_positive, default=16)
    ev.add_argument("--out", default="icl-results", help="folder for icl.md, icl.json and icl.png")
    ev.set_defaults(func=_cmd_icl_eval)
    ex = isub.add_parser(
        "experiment",
        help="the ICL science suite: train small models and reproduce an ICL result (GPT vs LSTM), or measure an "
        "ICL effect on a real model",
        description="Experiments: regression (in-context linear regression, Garg et al. 2022), "
        "recall (multi-query associative recall, Arora et al. 2023), induction (induction heads, Olsson et al. 2022), "
        "fewshot (arbitrary-label few-shot classification, bursty vs uniform data, in the spirit of Chan et al. 2022), "
        "or all; and on a real model (--model, default smollm2): label_correctness (random vs gold demonstration "
        "labels, Min et al. 2022), flipped_labels (flipped and unrelated labels, Wei et al. 2023), order "
        "(demonstration order with and without calibration, Lu et al. 2022). Writes icl_NAME.json "
        "and icl_NAME.png into --results and prints a table.",
    )
    ex.add_argument(
        "name",
        help="regression, recall, induction, fewshot or all; on a real model (--model, default smollm2): "
        "label_correctness (Min et al. 2022), flipped_labels (Wei et al. 2023), order (Lu et al. 2022)",
    )
    ex.add_argument("--model", default=None, help="label_correctness / flipped_labels / order: the model")
    ex.add_argument("--tokenizer", default=None, help=argparse.SUPPRESS)
    ex.add_argument("--layers", type=_positive, default=None, help=argparse.SUPPRESS)
    ex.add_argument(
        "--tasks", default=None, help="label effects: comma-separated classification tasks of the ICL suite"
    )
    ex.add_argument(
        "--quick", action="store_true", help="reduced sizes: every experiment in a few minutes (a smoke check)"
    )
    ex.add_argument("--results", default="docs/results", help="output folder")
    ex.add_argument("--seed", type=int, default=0)
    ex.set_defaults(func=_cmd_icl_experiment)

    f = sub.add_parser(
        "finetune",
        help="lightweight fine-tuning of a ferrolm model (LoRA, (IA)3, BitFit, prompt tuning, head-only, full)",
        description="Fine-tunes a ferrolm checkpoint on text (default: the embedded ICL task rendered as text). "
        "Writes model.safetensors (LoRA / (IA)3 merged) and, for LoRA or (IA)3 on a GPT or Llama, adapter/ in "
        "PEFT's layout.",
    )
    f.add_argument(
        "action",
        nargs="?",
        default="run",
        choices=["run", "experiment"],
        help="run: fine-tune --model with --method; experiment: with --model, ICL against every fine-tuning "
        "method on the ICL task suite (n training examples x seeds, a learning-rate sweep, resumable); without, "
        "the small GPT/LSTM comparison on the embedded task",
    )
    f.add_argument("--method", default=None, choices=["lora", "ia3", "bitfit", "prompt", "head", "full"])
    f.add_argument(
        "--model", default=None, help="smollm2, a .gguf file, a `ferrolm train` folder or a .safetensors checkpoint"
    )
    f.add_argument("--layers", type=_positive, default=None, help=argparse.SUPPRESS)
    f.add_argument("--results", default="docs/results", help="experiment: output folder (when --out is not given)")
    f.add_argument("--quick", action="store_true", help="experiment: tiny sizes (a smoke run)")
    f.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="DIR",
        help="experiment: join the icl_vs_finetune.json of runs on different --tasks (one process per core) "
        "into --out, without running anything",
    )
    f.add_argument(
        "--tasks",
        default=None,
        help="experiment --model: comma-separated ICL tasks (default: parity, article, "
        "addition, number_english; --quick: parity, addition)",
    )
    f.add_argument("--tokenizer", default=None)
    f.add_argument(
        "--data",
        default=None,
        help="JSONL/CSV examples (with outputs: trained as prompt -> output, the loss on the output only; "
        "inputs alone: as text) or a text file (default: the embedded task)",
    )
    f.add_argument("--input-key", default="input")
    f.add_argument("--output-key", default=None)
    f.add_argument("--out", default=None, help="run: output folder (default runs/finetune); experiment: results folder")
    f.add_argument("--steps", type=_positive, default=200)
    f.add_argument("--batch-size", type=_positive, default=8)
    f.add_argument("--seq-len", type=_positive, default=128)
    f.add_argument("--lr", type=_lr, default=1e-3)
    f.add_argument("--r", type=_positive, default=8, help="LoRA rank")
    f.add_argument("--alpha", type=_lr, default=16.0, help="LoRA alpha")
    f.add_argument("--lora-dropout", type=_fraction, default=0.0)
    f.add_argument(
        "--targets",
        default=None,
        help="LoRA / (IA)3 target modules, comma-separated (LoRA default: a GPT's c_attn,c_proj,c_fc; a Llama's "
        "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj; (IA)3 default: PEFT's, a Llama's "
        "k_proj,v_proj,down_proj with down_proj's input scaled)",
    )
    f.add_argument("--virtual-tokens", type=_positive, default=16, help="prompt tuning: virtual tokens")
    f.add_argument("--checkpoint-interval", type=_count, default=100)
    f.add_argument("--seed", type=int, default=1337)
    f.add_argument("--resume", action="store_true")
    f.set_defaults(func=_cmd_finetune)
    return p


#: Commands that run models, and so need torch (the tokenizer commands and `bench` need none:
#: `bench` skips the areas whose peers or torch are missing and says so).
_NEEDS_TORCH = ("train", "translate", "generate", "chat", "icl", "finetune")


def _missing_torch(command: str) -> Optional[str]:
    import importlib.util

    if command in _NEEDS_TORCH and importlib.util.find_spec("torch") is None:
        return (
            f"`ferrolm {command}` needs PyTorch, which is not installed: "
            "pip install 'ferrolm[torch]' (or pip install torch)"
        )
    return None


def main(argv: Optional[List[str]] = None) -> int:
    """Runs the command; a bad argument, file or value prints one line (no traceback) and
    returns 2."""
    args = build_parser().parse_args(argv)
    missing = _missing_torch(args.command)
    if missing:
        print(f"ferrolm: error: {missing}", file=sys.stderr)
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("ferrolm: interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError, ImportError) as e:  # not TypeError/KeyError: those are bugs, not user errors
        print(f"ferrolm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
