"""``ferrolm finetune experiment --model``'s recipe (ICL against fine-tuning, issue #23) in its
quick form on a tiny random Llama: every row is counted and bounded, the learning-rate sweep
picks the best validation rate, each method changes exactly its own parameters (tensors compared
before and after training, counts recomputed from the names), and a restart skips finished runs."""

from __future__ import annotations

import json
import re
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


def test_quick_experiment_rows_parameters_and_resume(tiny, tmp_path, capsys):
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

    # every training run was checked: per task, 8 methods x 2 seeds, plus IA3's 2-point sweep, less
    # IA3's seed-0 test run: the sweep's run at the chosen rate is that run (scored, not retrained)
    assert len(seen) == 2 * (8 * 2 + 2 - 1)
    assert sum(1 for s in seen if s[3] == "val") == 2 * 2
    for task in cfg.tasks:
        ia3 = [r for r in data["runs"].values() if r.get("method") == "(IA)³" and r["task"] == task and r["n"] == 16]
        best = next(r["lr"] for r in ia3 if r["split"] == "test" and r["seed"] == 1)
        test0, val0, test1 = (
            next(r for r in ia3 if (r["split"], r["seed"], r["lr"]) == want)
            for want in (("test", 0, best), ("val", 0, best), ("test", 1, best))
        )
        assert test0["from_sweep"] and "from_sweep" not in test1
        for f in ("trainable", "train_seconds", "peak_rss_added_bytes", "final_loss"):
            assert test0[f] == val0[f]
        assert (task, "(IA)³", 0, "test") not in seen and (task, "(IA)³", 1, "test") in seen

    big = [r for r in data["rows"] if r["n"] == 1000 and r["method"] != "ICL k=0"]
    assert len(big) == 2 * (2 + 8) and all("accuracy" not in r for r in big)
    assert all("fewer than n=1000 plus 6 for validation" in r["skipped"] for r in big)
    assert "n/a: task 'parity' has 400 pool examples, fewer than n=1000" in exp.markdown(data)
    # the summary: per task x n, each method's mean, the best ICL (k > 0) and the best fine-tuning
    for g in exp.glance(data):
        mine = [r for r in data["rows"] if (r["task"], r["n"]) == (g["task"], g["n"]) and "accuracy" in r]
        acc = {r["method"]: r["accuracy"] for r in mine}
        assert g["icl_k0"] == acc["ICL k=0"]
        for label, v in g["methods"].items():
            assert v == acc.get(label)
        icl = {m: a for m, a in acc.items() if m.startswith("ICL k=") and m != "ICL k=0"}
        ft = {m: a for m, a in acc.items() if not m.startswith("ICL")}
        assert g["best_icl"] == (None if not icl else max(icl.items(), key=lambda x: x[1]))
        assert g["best_finetune"] == (None if not ft else max(ft.items(), key=lambda x: x[1]))
        assert (g["n"] == 1000) == (g["best_icl"] is None and g["best_finetune"] is None)
    md = exp.markdown(data)
    # one summary line per task x n, then the full table's rows
    assert md.count("| parity | 16 | ") == 1 + sum((r["task"], r["n"]) == ("parity", 16) for r in data["rows"])
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

    # one process per task (per core): per-task files join into the same table
    from ferrolm import cli

    full = json.loads((tmp_path / exp.RESULTS_FILE).read_text())
    for task in cfg.tasks:
        part = {
            "settings": {**full["settings"], "tasks": [task]},
            "runs": {k: r for k, r in full["runs"].items() if r["task"] == task},
        }
        (tmp_path / task).mkdir()
        (tmp_path / task / exp.RESULTS_FILE).write_text(json.dumps(part))
    parts = [str(tmp_path / t) for t in reversed(cfg.tasks)]
    assert cli.main(["finetune", "experiment", "--merge", *parts, "--out", str(tmp_path / "joined")]) == 0
    joined = json.loads((tmp_path / "joined" / exp.RESULTS_FILE).read_text())
    assert joined["runs"] == full["runs"] and joined["settings"]["tasks"] == list(reversed(cfg.tasks))
    by_key = {(r["task"], r["n"], r["method"]): r for r in full["rows"]}
    assert sorted(by_key) == sorted((r["task"], r["n"], r["method"]) for r in joined["rows"])
    assert all(r == by_key[(r["task"], r["n"], r["method"])] for r in joined["rows"])
    # its summary line per n, then its rows
    assert (tmp_path / "joined" / "icl_vs_finetune.md").read_text().count("| parity |") == len(cfg.ns) + sum(
        r["task"] == "parity" for r in full["rows"]
    )
    # a later run of another task into a folder adds it: resumes ignore the tasks setting
    one = replace(cfg, tasks=(cfg.tasks[0],))
    data3 = exp.run_experiment(model, tok, one, tmp_path / cfg.tasks[1], model_name="tiny", progress=False)
    assert data3["settings"]["tasks"] == [cfg.tasks[1], cfg.tasks[0]]
    assert {r["task"] for r in data3["rows"]} == set(cfg.tasks)
    # runs that disagree, or settings that do, are refused
    bad = json.loads(json.dumps(joined))
    key = next(iter(bad["runs"]))
    bad["runs"][key]["accuracy"] = -1.0
    with pytest.raises(ValueError, match="differs between result 0 and result 1"):
        exp.merge_results([joined, bad])
    bad_dir = tmp_path / "bad"
    bad_dir.mkdir()
    (bad_dir / exp.RESULTS_FILE).write_text(json.dumps(bad))
    first_file = re.escape(str(tmp_path / "joined" / exp.RESULTS_FILE))
    second_file = re.escape(str(bad_dir / exp.RESULTS_FILE))
    args = ["finetune", "experiment", "--merge", str(tmp_path / "joined"), str(bad_dir), "--out", str(tmp_path / "j2")]
    capsys.readouterr()
    assert cli.main(args) != 0
    assert re.search(f"error: run .* differs between {first_file} and {second_file}", capsys.readouterr().err)
    with pytest.raises(ValueError, match="result 1 differs from result 0 in settings \\['steps'\\]"):
        exp.merge_results([joined, {**joined, "settings": {**joined["settings"], "steps": 99}}])


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


@pytest.mark.parametrize("prompt", [False, True])
def test_answer_only_loss_equals_the_full_forward(tiny, prompt):
    """The recipe's training loss runs the head at the answer positions only: the same value and
    the same gradients as the model's own loss over all positions (answer tokens counted)."""
    from ferrolm import finetune as ft

    model, tok = tiny
    pairs = [(tok.encode_ordinary("Question: 12 + 30 ="), tok.encode_ordinary(" 42\n")), ([5, 6], [7])]
    x, y = ft_batches(pairs)
    net = ft.PromptTuning(model, 3, seed=0) if prompt else model
    ref_loss = net(x, targets=y)[1]
    ref_grads = torch.autograd.grad(ref_loss, [p for p in net.parameters() if p.requires_grad])
    logits, loss = exp._AnswerLoss(net)(x, y)
    assert logits.shape == (int((y != -100).sum()), model.config.vocab_size)
    grads = torch.autograd.grad(loss, [p for p in net.parameters() if p.requires_grad])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def ft_batches(pairs):
    from ferrolm.training import ExampleBatches

    return ExampleBatches(pairs, batch_size=len(pairs), seq_len=32, shuffle=False).next()


def test_adapted_copies_share_frozen_storage_and_own_trained_tensors(tiny):
    model, _ = tiny
    base = {p.data_ptr() for p in model.parameters()}
    for spec in exp.METHODS:
        target, why = exp._adapt(model, None, spec, 0)
        if spec.method == "qlora":
            assert target is None and "no quantized base" in why
            continue
        trained = [p for p in target.parameters() if p.requires_grad]
        frozen = [p for p in target.parameters() if not p.requires_grad]
        assert trained and all(p.data_ptr() not in base for p in trained), spec.label
        assert all(p.data_ptr() in base for p in frozen), spec.label
        assert {id(p) for p in target.parameters()}.isdisjoint(id(p) for p in model.parameters())
    assert all(p.requires_grad for p in model.parameters())  # the base's own flags are untouched


def test_load_quantized_reads_the_blocks_of_a_gguf_only(tiny, tmp_path):
    import copy

    from ferrolm.quant import QuantLinear, quantize
    from ferrolm.recipes.language_model import load_quantized

    model, _ = tiny
    quantize(copy.deepcopy(model), "q8_0", head=None).save_gguf(tmp_path / "q.gguf")
    model.save_gguf(tmp_path / "f.gguf")
    q = load_quantized(tmp_path / "q.gguf")
    assert sum(isinstance(m, QuantLinear) for m in q.modules()) == 7 * model.config.n_layer
    x = torch.randint(0, model.config.vocab_size, (1, 12))
    with torch.no_grad():  # q8_0 blocks: within 0.01 of the float model's logits (their spread: ~0.1)
        torch.testing.assert_close(q(x)[0], model(x)[0], rtol=0, atol=0.01)
    assert load_quantized(tmp_path / "f.gguf") is None  # float matrices: the recipe quantizes itself
    assert load_quantized(tmp_path) is None  # not a GGUF
    with pytest.raises(FileNotFoundError, match="no GGUF file at"):
        load_quantized(tmp_path / "missing.gguf")
