"""``ferrolm finetune experiment --model``'s recipe (ICL against fine-tuning, issue #23) in its
quick form on a tiny random Llama: every row is counted and bounded, the learning-rate sweep
picks the best validation rate, each method changes exactly its own parameters (tensors compared
before and after training, counts recomputed from the names), and a restart skips finished runs."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

torch = pytest.importorskip("torch")

from ferrolm.corpus import default_corpus  # noqa: E402
from ferrolm.models import Llama, LlamaConfig  # noqa: E402
from ferrolm.recipes import icl_vs_finetune as exp  # noqa: E402
from ferrolm.tokenizer import Tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    tok = Tokenizer.train(default_corpus(60_000), vocab_size=300)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=tok.n_vocab, block_size=256, n_layer=1, n_head=2, n_embd=32, ff_size=64, attention_bias=True
    )
    return Llama(cfg).eval(), tok


def _config():
    quick = exp.ExperimentConfig.quick()
    methods = tuple(
        replace(m, lrs=(1e-3, 3e-2)) if m.method == "ia3" else replace(m, n_virtual=4) if m.method == "prompt" else m
        for m in quick.methods
    )
    # n=1000 is more than the tasks' pools hold: those rows are skipped and say why
    return replace(quick, ns=(16, 1000), seeds=(0, 1), methods=methods, steps=3, n_val=6, n_test=6)


def _owned(method: str, key: str) -> bool:
    """The test's own rule for which state_dict entries a method may change."""
    if method in ("lora", "qlora"):
        return ".lora_A." in key or ".lora_B." in key
    if method == "ia3":
        return key.endswith(".ia3_l")
    if method == "bitfit":
        return key.endswith(".bias")
    if method == "prompt":
        return key == "prompt"
    if method == "head":
        return key == "lm_head.weight"
    return not key.endswith("qweight")  # full: every parameter


def test_quick_experiment_rows_parameters_and_resume(tiny, tmp_path):
    model, tok = tiny
    cfg = _config()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    method_of = {m.label: m.method for m in cfg.methods}
    seen = []

    def check(run, before, trained):
        method = method_of[run["method"]]
        after = trained.state_dict()
        assert sorted(after) == sorted(before)
        changed = {k for k in after if not torch.equal(after[k], before[k])}
        owned = {k for k in after if _owned(method, k) and after[k].is_floating_point()}
        assert changed <= owned, (run["method"], sorted(changed - owned))
        # k_proj's bias shifts every score of a query equally: softmax ignores it, its gradient is 0
        assert owned - changed <= {k for k in owned if k.endswith("k_proj.bias")}, (run["method"], owned - changed)
        assert run["trainable"] == sum(after[k].numel() for k in owned)
        seen.append((run["task"], run["method"], run["seed"], run["split"]))

    data = exp.run_experiment(model, tok, cfg, tmp_path, model_name="tiny", progress=False, on_trained=check)
    for k, v in model.state_dict().items():
        assert torch.equal(v, base_state[k]), k  # the base model is never changed

    # every training run was checked: per task, 8 methods x 2 seeds, plus IA3's 2-point sweep
    assert len(seen) == 2 * (8 * 2 + 2)
    assert sum(1 for s in seen if s[3] == "val") == 2 * 2

    big = [r for r in data["rows"] if r["n"] == 1000 and r["method"] != "ICL k=0"]
    assert len(big) == 2 * (2 + 8) and all("accuracy" not in r for r in big)
    assert all("fewer than n=1000 plus 6 for validation" in r["skipped"] for r in big)
    assert "n/a: task 'parity' has 400 pool examples, fewer than n=1000" in exp.markdown(data)
    rows = [r for r in data["rows"] if r["n"] == 16]
    icl_labels = ["ICL k=0", "ICL k=4 (bm25)", "ICL k=4 (random)"]
    ft_labels = [m.label for m in cfg.methods]
    for task in cfg.tasks:
        labels = sorted(r["method"] for r in rows if r["task"] == task)
        assert labels == sorted(icl_labels + ft_labels)
    for r in rows:
        want_seeds = 1 if r["method"] == "ICL k=0" else 2
        assert r["seeds"] == want_seeds and len(r["per_seed"]) == want_seeds
        assert 0 <= r["ci_low"] <= r["accuracy"] <= r["ci_high"] <= 1
        mean = sum(r["per_seed"]) / len(r["per_seed"])
        assert abs(r["accuracy"] - mean) < 1e-12
        # accuracies are fractions of the 6 test questions
        assert all(abs(a * 6 - round(a * 6)) < 1e-9 for a in r["per_seed"])
        assert r["tokens_per_question"] > 0
        if r["kind"] == "finetune":
            assert r["trainable"] > 0 and r["train_seconds"] > 0
    # ICL pays for its demonstrations at every question; prompt tuning for its virtual tokens
    for task in cfg.tasks:
        by = {r["method"]: r for r in rows if r["task"] == task}
        assert by["ICL k=4 (random)"]["tokens_per_question"] > by["ICL k=0"]["tokens_per_question"] + 4 * 3
        if task == "parity":  # classification: the same label tokens scored for every model
            assert by["prompt tuning (16 tokens)"]["tokens_per_question"] == pytest.approx(
                by["full fine-tuning"]["tokens_per_question"] + 4
            )
        ia3 = by["(IA)³"]
        val = ia3["val_accuracy_by_lr"]
        assert sorted(val) == ["0.001", "0.03"]
        best = max(val.items(), key=lambda kv: (kv[1], -float(kv[0])))[0]
        assert ia3["lr"] == float(best)

    # the file holds it all; a restart runs nothing again and gives the same rows
    on_disk = json.loads((tmp_path / exp.RESULTS_FILE).read_text())
    assert on_disk["rows"] == json.loads(json.dumps(data["rows"]))
    again = []
    data2 = exp.run_experiment(
        model, tok, cfg, tmp_path, model_name="tiny", progress=False, on_trained=lambda r, b, t: again.append(r)
    )
    assert again == [] and data2["rows"] == on_disk["rows"]
    # a run lost from the file (killed before it was written) is the only one that runs again
    lost = [k for k, r in on_disk["runs"].items() if r.get("method") == "BitFit" and r["seed"] == 1][0]
    del on_disk["runs"][lost]
    (tmp_path / exp.RESULTS_FILE).write_text(json.dumps(on_disk))
    exp.run_experiment(
        model, tok, cfg, tmp_path, model_name="tiny", progress=False, on_trained=lambda r, b, t: again.append(r)
    )
    assert len(again) == 1 and again[0]["method"] == "BitFit" and again[0]["seed"] == 1
    # other settings in the same folder are refused, naming what differs
    with pytest.raises(ValueError, match="differing in \\['steps'\\]"):
        exp.run_experiment(model, tok, replace(cfg, steps=4), tmp_path, model_name="tiny", progress=False)


def test_bad_settings_are_refused_by_name(tmp_path, capsys):
    from ferrolm import cli

    with pytest.raises(ValueError, match="ks \\(0, 32\\) ask for more demonstrations than the smallest n=16"):
        exp.ExperimentConfig(ns=(16, 64), ks=(0, 32))
    with pytest.raises(ValueError, match="unknown method 'lorax'"):
        exp.MethodSpec("x", "lorax", (1e-3,))
    with pytest.raises(ValueError, match="batch_size=32 exceeds the smallest n=16"):
        exp.ExperimentConfig(batch_size=32)
    (tmp_path / exp.RESULTS_FILE).write_text("[1, 2]")
    with pytest.raises(ValueError, match="not a results file of this experiment"):
        exp._Store(tmp_path / exp.RESULTS_FILE, {"model": "x"})
    # the CLI names an unknown task before loading any model
    assert cli.main(["finetune", "experiment", "--model", "smollm2", "--tasks", "parity,nope"]) == 2
    assert "unknown ICL task 'nope'" in capsys.readouterr().err
