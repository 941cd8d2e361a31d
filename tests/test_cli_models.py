"""`ferrolm train`, `ferrolm generate` and `ferrolm bench --only` end to end, as a user runs them."""

from __future__ import annotations

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from ferrolm.models import GPT, GPTConfig, LSTMLanguageModel, load_model  # noqa: E402
from ferrolm.training import load_train_state  # noqa: E402


def _ferrolm(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "ferrolm.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("arch", ["gpt", "lstm"])
def test_train_resume_and_generate(tmp_path, arch):
    out = tmp_path / arch
    common = [
        "--out",
        str(out),
        "--max-bytes",
        "200000",
        "--vocab-size",
        "512",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--n-layer",
        "1",
        "--n-embd",
        "32",
        "--hidden-size",
        "32",
        "--num-layers",
        "1",
        "--eval-interval",
        "5",
        "--checkpoint-interval",
        "5",
    ]
    done = _ferrolm("train", arch, "--steps", "6", *common)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "step 6: loss" in done.stdout and "perplexity" in done.stdout
    model = load_model(out / "model.safetensors")
    assert isinstance(model, GPT if arch == "gpt" else LSTMLanguageModel)
    assert load_train_state(out)["step"] == 6
    more = _ferrolm("train", arch, "--steps", "10", "--resume", *common)
    assert more.returncode == 0, more.stderr[-2000:]
    assert load_train_state(out)["step"] == 10 and "step 10: loss" in more.stdout
    gen = _ferrolm("generate", str(out), "--prompt", "def f(x):", "--max-new-tokens", "8", "--temperature", "0")
    assert gen.returncode == 0, gen.stderr[-2000:]
    assert gen.stdout.startswith("def f(x):")
    again = _ferrolm("generate", str(out), "--prompt", "def f(x):", "--max-new-tokens", "8", "--temperature", "0")
    assert again.stdout == gen.stdout  # greedy is deterministic


def test_errors_are_one_line_without_traceback(tmp_path):
    for args in (
        ["generate", str(tmp_path / "nothing")],
        ["train", "gpt", str(tmp_path / "missing.txt")],
        ["train", "gpt", "--steps", "0", "--out", str(tmp_path / "x"), "--max-bytes", "50000", "--vocab-size", "300"],
        ["bench", "--only", "data", "--repeats", "0", "--no-report"],
    ):
        done = _ferrolm(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert "Traceback" not in done.stderr
        assert done.stderr.startswith("ferrolm: error: ") or "error:" in done.stderr
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    done = _ferrolm("generate", str(bad), "--tokenizer", str(bad))
    assert done.returncode == 2 and "Traceback" not in done.stderr


def test_help_everywhere():
    for args in (
        ["--help"],
        ["train", "--help"],
        ["generate", "--help"],
        ["bench", "--help"],
        ["tokenizer", "train", "--help"],
        ["icl", "eval", "--help"],
        ["finetune", "--help"],
        ["translate", "--help"],
    ):
        done = _ferrolm(*args)
        assert done.returncode == 0 and "usage: ferrolm" in done.stdout, args


@pytest.mark.parametrize("model", ["transformer", "lstm"])
def test_train_seq2seq_resume_and_translate(tmp_path, model):
    pairs = tmp_path / "pairs.tsv"
    from ferrolm.recipes.numwords import english, french

    pairs.write_text("".join(f"{english(n)}\t{french(n)}\n" for n in range(0, 3000, 7)), encoding="utf-8")
    out = tmp_path / model
    common = [
        "--model",
        model,
        "--out",
        str(out),
        "--vocab-size",
        "300",
        "--batch-size",
        "16",
        "--n-layer",
        "1",
        "--n-embd",
        "32",
        "--ff-size",
        "64",
        "--hidden-size",
        "32",
        "--num-layers",
        "1",
        "--beam",
        "2",
        "--checkpoint-interval",
        "3",
    ]
    done = _ferrolm("train", "seq2seq", str(pairs), "--steps", "4", *common)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "greedy: BLEU" in done.stdout and "beam2: BLEU" in done.stdout
    import json

    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 4 and res["test"]["greedy"]["n"] == len(range(0, 3000, 7)) // 20
    assert load_train_state(out)["step"] == 4
    more = _ferrolm("train", "seq2seq", str(pairs), "--steps", "6", "--resume", *common)
    assert more.returncode == 0, more.stderr[-2000:]
    assert load_train_state(out)["step"] == 6
    tr = _ferrolm("translate", "--model", str(out), "three hundred", "forty-two", "--max-new-tokens", "6")
    assert tr.returncode == 0, tr.stderr[-2000:]
    assert len(tr.stdout.splitlines()) == 2
    from ferrolm.recipes.translation import translate_texts
    from ferrolm.tokenizer import Tokenizer

    m = load_model(out / "model.safetensors")
    expect = translate_texts(
        m, Tokenizer.from_hf_json(out / "tokenizer.json"), ["three hundred", "forty-two"], max_new_tokens=6
    )
    assert tr.stdout.splitlines() == expect
    wrong = _ferrolm("translate", "--model", str(out), "--beam", "0", "one")
    assert wrong.returncode == 2 and "--beam" in wrong.stderr
    gpt_dir = tmp_path / "gpt"
    GPT(GPTConfig(vocab_size=300, block_size=8, n_layer=1, n_head=1, n_embd=8)).save(gpt_dir / "model.safetensors")
    other = _ferrolm("translate", "--model", str(gpt_dir), "one")
    assert other.returncode == 2 and "not a seq2seq model" in other.stderr
