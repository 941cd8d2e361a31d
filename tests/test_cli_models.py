"""`ferrolm train`, `ferrolm generate` and `ferrolm bench --only` end to end, as a user runs them."""

from __future__ import annotations

import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")

from ferrolm.models import GPT, LSTMLanguageModel, load_model  # noqa: E402
from ferrolm.train import load_train_state  # noqa: E402


def _ferrolm(*args, timeout=600):
    return subprocess.run([sys.executable, "-m", "ferrolm.cli", *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("arch", ["gpt", "lstm"])
def test_train_resume_and_generate(tmp_path, arch):
    out = tmp_path / arch
    common = ["--out", str(out), "--max-bytes", "200000", "--vocab-size", "512", "--batch-size", "4", "--seq-len", "32",
              "--n-layer", "1", "--n-embd", "32", "--hidden-size", "32", "--num-layers", "1", "--eval-interval", "5",
              "--checkpoint-interval", "5"]
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
    for args in (["generate", str(tmp_path / "nothing")], ["train", "gpt", str(tmp_path / "missing.txt")],
                 ["train", "gpt", "--steps", "0", "--out", str(tmp_path / "x"), "--max-bytes", "50000", "--vocab-size", "300"]):
        done = _ferrolm(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert "Traceback" not in done.stderr
        assert done.stderr.startswith("ferrolm: error: ") or "error:" in done.stderr
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a checkpoint")
    done = _ferrolm("generate", str(bad), "--tokenizer", str(bad))
    assert done.returncode == 2 and "Traceback" not in done.stderr


def test_help_everywhere():
    for args in (["--help"], ["train", "--help"], ["generate", "--help"], ["bench", "--help"], ["tokenizer", "train", "--help"],
                 ["icl", "eval", "--help"], ["finetune", "--help"]):
        done = _ferrolm(*args)
        assert done.returncode == 0 and "usage: ferrolm" in done.stdout, args
