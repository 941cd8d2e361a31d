"""Lightweight fine-tuning: LoRA (fresh = unchanged, merge == unmerged, frozen weights stay
bit-identical, gradients only where they should be), BitFit/head counts, PEFT round trips."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ferrolm.finetune import (  # noqa: E402
    LoRALinear,
    apply_lora,
    load_lora,
    merge_and_unload,
    merge_lora,
    prepare,
    save_lora,
    trainable_parameters,
    unmerge_lora,
)
from ferrolm.models import GPT, ClassifierConfig, GPTConfig, SequenceClassifier  # noqa: E402


def _gpt(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_embd=16)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def _randomise_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.1)


def test_fresh_lora_changes_nothing_and_merge_equals_unmerged():
    model = _gpt()
    idx = torch.randint(0, 64, (2, 10))
    before = model(idx)[0]
    names = apply_lora(model, r=4, alpha=8, target_modules=["c_attn", "c_proj"])
    assert len(names) == 2 * 3  # attn.c_attn, attn.c_proj, mlp.c_proj per layer
    torch.testing.assert_close(model(idx)[0], before, rtol=0, atol=0)
    _randomise_lora(model)
    adapted = model(idx)[0]
    assert (adapted - before).abs().max() > 1e-3
    w0 = model.transformer.h[0].attn.c_attn.base.weight.clone()
    merge_lora(model)
    torch.testing.assert_close(model(idx)[0], adapted, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="already merged"):
        merge_lora(model)
    unmerge_lora(model)
    torch.testing.assert_close(model.transformer.h[0].attn.c_attn.base.weight, w0, rtol=1e-6, atol=1e-6)
    merge_and_unload(model)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert set(model.state_dict()) == set(_gpt().state_dict())
    torch.testing.assert_close(model(idx)[0], adapted, rtol=1e-5, atol=1e-5)


def test_lora_training_moves_only_the_adapters():
    from ferrolm.training import TrainConfig, make_optimizer, train

    model = _gpt()
    apply_lora(model, r=2, alpha=4, target_modules=["c_attn"])
    prepare(model, "lora")
    frozen = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    lora_before = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    tokens = np.random.default_rng(0).integers(0, 64, 5_000)
    cfg = TrainConfig(max_steps=4, batch_size=2, seq_len=16, lr=1e-2, warmup_steps=0, progress=False)
    opt = make_optimizer(model, cfg)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == trainable_parameters(model)[0]
    train(model, tokens, config=cfg)
    for k, v in model.state_dict().items():
        if k in frozen:
            assert torch.equal(v, frozen[k]), f"{k} changed"
    assert any(not torch.equal(model.state_dict()[k], v) for k, v in lora_before.items())
    _, loss = model(torch.randint(0, 64, (1, 8)), targets=torch.randint(0, 64, (1, 8)))
    model.zero_grad(set_to_none=True)
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == ("lora_" in n), n


def test_parameter_counts_are_exact():
    model = _gpt()
    C, L, V, T = 16, 2, 64, 32
    total = (
        V * C
        + T * C
        + L * (2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C))
        + 2 * C
    )
    assert trainable_parameters(model) == (total, total)
    prepare(model, "bitfit")
    biases = L * (2 * C + 3 * C + C + 4 * C + C) + C
    assert trainable_parameters(model)[0] == biases
    prepare(model, "head")  # the head is tied to the embedding: V * C
    assert trainable_parameters(model)[0] == V * C
    clf = SequenceClassifier(
        ClassifierConfig(GPTConfig(vocab_size=64, block_size=32, n_layer=1, n_head=2, n_embd=16), num_classes=3)
    )
    prepare(clf, "head")
    assert trainable_parameters(clf)[0] == 16 * 3 + 3
    apply_lora(clf, r=2, alpha=2, target_modules=["c_attn"])
    prepare(clf, "lora")
    assert trainable_parameters(clf)[0] == (2 * 16 + 48 * 2) + 16 * 3 + 3


def test_bad_lora_input():
    model = _gpt()
    with pytest.raises(
        ValueError,
        match=r"match no nn.Linear; the model's linear layers are named \['c_attn', 'c_fc', 'c_proj', 'lm_head'\]",
    ):
        apply_lora(model, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="rank"):
        apply_lora(model, r=0, target_modules=["c_attn"])
    with pytest.raises(ValueError, match="alpha"):
        apply_lora(_gpt(), r=2, alpha=0, target_modules=["c_attn"])
    with pytest.raises(ValueError, match="no LoRA layers"):
        prepare(_gpt(), "lora")
    with pytest.raises(ValueError, match="method"):
        prepare(_gpt(), "adapters")


def _hf():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    return transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=80, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    ).eval()


def test_ferrolm_lora_loads_in_peft(tmp_path):
    peft = pytest.importorskip("peft")
    hf = _hf()
    ours = GPT.from_hf_gpt2(hf).eval()
    apply_lora(ours, r=4, alpha=8, target_modules=["c_attn", "c_fc"])
    _randomise_lora(ours)
    save_lora(ours, tmp_path)
    idx = torch.randint(0, 80, (2, 12))
    with torch.no_grad():
        base_logits = hf(idx).logits
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(hf, str(tmp_path)).eval()
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    with torch.no_grad():
        got = pm(idx).logits
    torch.testing.assert_close(got, ours(idx)[0], rtol=1e-4, atol=1e-4)
    assert (got - base_logits).abs().max() > 1e-3  # the adapter really changes the model


def test_peft_lora_loads_in_ferrolm(tmp_path):
    peft = pytest.importorskip("peft")
    hf = _hf()
    base = GPT.from_hf_gpt2(hf).eval()
    pm = peft.get_peft_model(
        hf,
        peft.LoraConfig(
            r=4,
            lora_alpha=16,
            target_modules=["c_attn", "c_proj"],
            fan_in_fan_out=True,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
        ),
    )
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    pm.save_pretrained(str(tmp_path))
    names = load_lora(base, tmp_path)
    assert len(names) == 2 * 3
    idx = torch.randint(0, 80, (2, 12))
    with torch.no_grad():
        want = pm.eval()(idx).logits
        torch.testing.assert_close(base(idx)[0], want, rtol=1e-4, atol=1e-4)
    one_layer = GPT(GPTConfig(vocab_size=80, block_size=32, n_layer=1, n_head=4, n_embd=32))
    with pytest.raises(ValueError, match="targets modules this model lacks"):
        load_lora(one_layer, tmp_path)


def test_prompt_tuning_prefix_and_training():
    from ferrolm.finetune import PromptTuning
    from ferrolm.training import TrainConfig, train

    model = _gpt()
    init = [5, 9, 11]
    pt = PromptTuning(model, 3, init_ids=init).eval()
    idx = torch.randint(0, 64, (2, 7))
    # Virtual tokens initialised from ids 5, 9, 11 == running those ids as real tokens first.
    full, _ = model(torch.cat([torch.tensor([init, init]), idx], 1))
    got, _ = pt(idx)
    torch.testing.assert_close(got, full[:, 3:], rtol=1e-5, atol=1e-5)
    lengths = torch.tensor([7, 4])
    got_l, _ = pt(idx, lengths=lengths)
    torch.testing.assert_close(got_l[1, :4], full[1, 3:7], rtol=1e-5, atol=1e-5)
    prepare(pt, "prompt")
    assert trainable_parameters(pt)[0] == 3 * 16
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    before = pt.prompt.detach().clone()
    train(
        pt,
        np.random.default_rng(0).integers(0, 64, 5_000),
        config=TrainConfig(max_steps=3, batch_size=2, seq_len=16, lr=1e-2, warmup_steps=0, progress=False),
    )
    assert all(torch.equal(v, frozen[k]) for k, v in model.state_dict().items())
    assert not torch.equal(pt.prompt.detach(), before)
    with pytest.raises(ValueError, match="PromptTuning wrapper"):
        prepare(model, "prompt")
    with pytest.raises(ValueError, match="n_virtual"):
        PromptTuning(model, 0)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_lora_on_recurrent_weights(cell):
    from ferrolm.finetune import apply_lora_rnn, merge_lora_rnn
    from ferrolm.models import LSTMConfig, LSTMLanguageModel

    torch.manual_seed(4)
    model = LSTMLanguageModel(LSTMConfig(vocab_size=50, n_embd=12, hidden_size=16, num_layers=2, cell=cell)).eval()
    idx = torch.randint(0, 50, (3, 9))
    before = model(idx)[0]
    names = apply_lora_rnn(model.rnn, r=2, alpha=4)
    assert names == ["weight_ih_l0", "weight_hh_l0", "weight_ih_l1", "weight_hh_l1"]
    torch.testing.assert_close(model(idx)[0], before, rtol=0, atol=0)
    prepare(model, "lora")
    g = 4 if cell == "lstm" else 3
    # weight_ih_l0 (gH x 12), then three gH x 16 matrices; A is r x in, B is out x r
    assert trainable_parameters(model)[0] == (2 * 12 + g * 16 * 2) + 3 * (2 * 16 + g * 16 * 2)
    _, loss = model(idx, targets=torch.randint(0, 50, (3, 9)))
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    assert all((grads[n] is not None) == ("lora_" in n) for n in grads)
    # The factors' gradients through ferrolm's kernel equal those through torch's own LSTM
    # forward on the same parametrized module.
    import copy

    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(torch.randn_like(p) * 0.1)
    tgt = torch.randint(0, 50, (3, 9))
    model.zero_grad(set_to_none=True)
    model(idx, targets=tgt)[1].backward()
    twin = copy.deepcopy(model)
    twin.zero_grad(set_to_none=True)
    base_forward = (torch.nn.LSTM if cell == "lstm" else torch.nn.GRU).forward
    out, _ = base_forward(twin.rnn, twin.embed(idx))
    torch.nn.functional.cross_entropy(twin.head(out).reshape(-1, 50), tgt.reshape(-1)).backward()
    for (n, a), b in zip(model.named_parameters(), twin.parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=n)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    adapted = model(idx)[0]
    # torch's own LSTM reads the parametrized weights the same way.
    ref = (torch.nn.LSTM if cell == "lstm" else torch.nn.GRU)(12, 16, num_layers=2, batch_first=True)
    with torch.no_grad():
        for n, _ in ref.named_parameters():
            getattr(ref, n).copy_(getattr(model.rnn, n))
        want = model.head(ref(model.embed(idx))[0])
    torch.testing.assert_close(adapted, want, rtol=1e-5, atol=1e-5)
    merge_lora_rnn(model.rnn)
    torch.testing.assert_close(model(idx)[0], adapted, rtol=1e-5, atol=1e-5)
    assert set(model.state_dict()) == set(LSTMLanguageModel(model.config).state_dict())
    with pytest.raises(ValueError, match="no LoRA parametrization"):
        merge_lora_rnn(model.rnn)
    with pytest.raises(ValueError, match="match no parameter"):
        apply_lora_rnn(model.rnn, weights=["w_q"])


def test_cli_finetune_lora_resume_and_adapter(tmp_path):
    import subprocess
    import sys

    from ferrolm import Tokenizer
    from ferrolm.corpus import default_corpus
    from ferrolm.models import load_model
    from ferrolm.training import load_train_state

    tok = Tokenizer.train(default_corpus(100_000), vocab_size=300)
    base_dir = tmp_path / "base"
    base_dir.mkdir()
    tok.save_hf_json(base_dir / "tokenizer.json")
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=tok.n_vocab, block_size=64, n_layer=1, n_head=2, n_embd=16)).save(
        base_dir / "model.safetensors"
    )
    out = tmp_path / "ft"
    cmd = [
        sys.executable,
        "-m",
        "ferrolm.cli",
        "finetune",
        "--method",
        "lora",
        "--model",
        str(base_dir),
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--seq-len",
        "32",
        "--r",
        "2",
        "--targets",
        "c_attn",
        "--checkpoint-interval",
        "2",
    ]
    first = subprocess.run(cmd + ["--steps", "3"], capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "trainable params: " in first.stdout and load_train_state(out)["step"] == 3
    more = subprocess.run(cmd + ["--steps", "5", "--resume"], capture_output=True, text=True, timeout=600)
    assert more.returncode == 0, more.stderr[-2000:]
    assert load_train_state(out)["step"] == 5
    merged = load_model(out / "model.safetensors").eval()
    base = load_model(base_dir / "model.safetensors").eval()
    load_lora(base, out / "adapter")
    idx = torch.randint(0, tok.n_vocab, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(idx)[0], base(idx)[0], rtol=1e-5, atol=1e-5)


def test_experiment_quick_writes_the_table(tmp_path):
    from ferrolm.recipes.finetune_experiment import run_experiment

    res = run_experiment(tmp_path, quick=True, n_seeds=2, progress=False)
    ft_methods = [
        "full fine-tuning",
        "LoRA r=4",
        "LoRA r=8",
        "LoRA r=16",
        "BitFit",
        "prompt tuning (16 tokens)",
        "head-only",
    ]
    icl = ["in-context learning, k=0", "in-context learning, k=4", "in-context learning, k=16"]
    assert [r["method"] for r in res["rows"] if r["model"] == "GPT"] == ft_methods + icl
    assert [r["method"] for r in res["rows"] if r["model"] == "LSTM"] == [
        m for m in ft_methods if not m.startswith("prompt")
    ] + icl
    for arch in ("GPT", "LSTM"):
        rows = {r["method"]: r for r in res["rows"] if r["model"] == arch}
        full = rows["full fine-tuning"]
        assert (
            full["trainable"] == full["total"] == res["pretrain"][arch]["parameters"] and full["trainable_pct"] == 100.0
        )
        assert rows["LoRA r=8"]["trainable"] == 2 * rows["LoRA r=4"]["trainable"]
        assert rows["BitFit"]["trainable"] < rows["LoRA r=4"]["trainable"] < full["trainable"]
        for r in rows.values():
            assert 0.0 <= r["ci_low"] <= r["accuracy"] <= r["ci_high"] <= 1.0
            assert len(r["per_seed"]) == (1 if r["method"].endswith("k=0") else 2)
            assert r["accuracy"] == pytest.approx(sum(r["per_seed"]) / len(r["per_seed"]))
        assert full["peak_mb"] is None or full["peak_mb"] > 0
    assert (tmp_path / "finetune.md").read_text().startswith("| model | method | accuracy")
    assert json.loads((tmp_path / "finetune.json").read_text())["task"]["chance"] == pytest.approx(1 / 6)
    assert (tmp_path / "finetune.png").read_bytes()[:4] == b"\x89PNG"


def test_peak_memory_sees_a_block_s_largest_allocation_even_when_freed_inside():
    import sys

    from ferrolm._memory import PeakMemory

    if not sys.platform.startswith("linux"):
        pytest.skip("peak memory is read from /proc")
    with PeakMemory() as m:
        a = torch.ones(50_000_000)  # 200 MB, touched
        del a
    assert m.peak_bytes is not None and 190e6 < m.peak_bytes < 260e6
    with PeakMemory() as small:
        b = torch.ones(1000)
        del b
    assert small.peak_bytes < 20e6  # what was freed before the block does not count


def test_lora_on_a_transformers_gpt2_conv1d_equals_peft(tmp_path):
    """LoRA straight on GPT-2's Conv1D layers (weights stored (in, out)): the same outputs as
    PEFT's fan_in_fan_out LoRA with the same factors, merge == unmerged, and the adapter
    loads in PEFT."""
    import copy

    peft = pytest.importorskip("peft")
    hf = _hf()
    ref = copy.deepcopy(hf)
    names = apply_lora(hf, r=4, alpha=8, target_modules=["c_attn", "c_proj"])
    assert len(names) == 2 * 3 and all(
        type(m.base).__name__ == "Conv1D" for m in hf.modules() if isinstance(m, LoRALinear)
    )
    _randomise_lora(hf)
    pm = peft.get_peft_model(
        copy.deepcopy(ref),
        peft.LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["c_attn", "c_proj"],
            fan_in_fan_out=True,
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
        ),
    )
    ours = dict(hf.named_parameters())
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(ours[n.removeprefix("base_model.model.").replace(".default.", ".")])
    idx = torch.randint(0, 80, (2, 12))
    with torch.no_grad():
        got = hf(idx).logits
        torch.testing.assert_close(got, pm.eval()(idx).logits, rtol=1e-4, atol=1e-4)
        assert (got - ref(idx).logits).abs().max() > 1e-3
        merge_lora(hf)
        torch.testing.assert_close(hf(idx).logits, got, rtol=1e-5, atol=1e-5)
    save_lora(hf, tmp_path)
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(ref), str(tmp_path)).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(idx).logits, got, rtol=1e-4, atol=1e-4)
    merge_and_unload(hf)
    assert type(hf.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
