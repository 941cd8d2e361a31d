"""(IA)³ (Liu et al. 2022) against PEFT's ``IA3``: on a random transformers ``LlamaForCausalLM``
converted with ``Llama.from_hf`` (and a GPT-2), ferrolm's (IA)³ gives PEFT's logits and gradients
with the same nonzero vectors, adapters load both ways, only the vectors train, merged weights
equal the scaled ones, and bad adapter files are refused by name."""

from __future__ import annotations

import json
import warnings

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors.torch import load_file, save_file  # noqa: E402

from ferrolm.errors import FormatError  # noqa: E402
from ferrolm.finetune import (  # noqa: E402
    IA3Linear,
    apply_ia3,
    apply_lora,
    load_ia3,
    load_lora,
    merge_and_unload,
    prepare,
    save_ia3,
    trainable_parameters,
)
from ferrolm.models import GPT, Llama, load_model, save_model  # noqa: E402

IDX = torch.tensor([[3, 14, 15, 9, 26, 5, 35], [8, 9, 7, 9, 3, 2, 38]])


def _hf(seed: int = 0, intermediate_size: int = 48):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=intermediate_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def _randomise(model, seed: int = 1) -> None:
    """Vectors away from ones (the identity), so an adapter that is ignored or misplaced shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "ia3_l" in n:
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))


def _peft_ia3(hf):
    return peft.get_peft_model(hf, peft.IA3Config(task_type="CAUSAL_LM"))


def test_fresh_ia3_changes_nothing_and_targets_peft_defaults():
    model = Llama.from_hf(_hf()).eval()
    with torch.no_grad():
        before = model(IDX)[0]
    names = apply_ia3(model)
    assert names == [
        f"model.layers.{i}.{m}" for i in (0, 1) for m in ("self_attn.k_proj", "self_attn.v_proj", "mlp.down_proj")
    ]
    ff = {n for n, m in model.named_modules() if isinstance(m, IA3Linear) and m.feedforward}
    assert ff == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    with torch.no_grad():
        torch.testing.assert_close(model(IDX)[0], before, atol=0, rtol=0)
    prepare(model, "ia3")
    # PEFT's count on the same model: k, v (16 outputs each with 2 kv heads x 8) and down_proj (48 inputs)
    pm = _peft_ia3(_hf())
    want = sum(p.numel() for p in pm.parameters() if p.requires_grad)
    assert trainable_parameters(model)[0] == want == 2 * (16 + 16 + 48)


def test_ferrolm_ia3_loads_in_peft_with_equal_logits(tmp_path):
    model = Llama.from_hf(_hf()).eval()
    apply_ia3(model)
    _randomise(model)
    save_ia3(model, tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "IA3" and cfg["feedforward_modules"] == ["down_proj"]
    assert cfg["target_modules"] == ["down_proj", "k_proj", "v_proj"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pm = peft.PeftModel.from_pretrained(_hf(), str(tmp_path / "adapter")).eval()
    assert not [w for w in caught if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]
    with torch.no_grad():
        want = pm(IDX).logits
        base = _hf()(IDX).logits
        got = model(IDX)[0]
    assert (want - base).abs().max() > 1e-2  # the vectors change the outputs
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # merged into the weights (and a checkpoint of the unmerged model): the same function
    path = tmp_path / "model.safetensors"
    save_model(model, path)
    with torch.no_grad():
        torch.testing.assert_close(load_model(path).eval()(IDX)[0], want, atol=1e-5, rtol=0)
        merge_and_unload(model)
        assert not any(isinstance(m, IA3Linear) for m in model.modules())
        torch.testing.assert_close(model(IDX)[0], want, atol=1e-5, rtol=0)


def test_peft_ia3_loads_in_ferrolm_with_equal_logits_and_round_trips(tmp_path):
    pm = _peft_ia3(_hf(seed=2))
    _randomise(pm, seed=3)
    pm.eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    model = Llama.from_hf(_hf(seed=2)).eval()
    names = load_ia3(model, tmp_path / "peft")
    assert len(names) == 2 * 3
    with torch.no_grad():
        torch.testing.assert_close(model(IDX)[0], pm(IDX).logits, atol=1e-5, rtol=0)
    # ferrolm writes back exactly PEFT's tensors (names, shapes, values)
    save_ia3(model, tmp_path / "again")
    theirs = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))
    ours = load_file(str(tmp_path / "again" / "adapter_model.safetensors"))
    assert sorted(theirs) == sorted(ours)
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k], atol=0, rtol=0)


def test_gradients_equal_peft_and_reach_only_the_vectors():
    hf = _hf(seed=4)
    model = Llama.from_hf(hf).train()
    apply_ia3(model)
    _randomise(model, seed=5)
    prepare(model, "ia3")
    pm = _peft_ia3(_hf(seed=4)).train()
    _randomise(pm, seed=5)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    loss = model(IDX[:, :-1], targets=IDX[:, 1:])[1]
    loss.backward()
    ref = pm(IDX, labels=IDX).loss  # transformers shifts the labels itself (causal: same positions)
    ref.backward()
    torch.testing.assert_close(loss, ref, atol=1e-6, rtol=0)
    theirs = {
        n.replace("base_model.model.", "").replace(".ia3_l.default", ""): p.grad
        for n, p in pm.named_parameters()
        if p.grad is not None
    }
    ours = {n.removesuffix(".ia3_l"): p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert sorted(ours) == sorted(theirs) and len(ours) == 6
    for n, g in ours.items():
        assert g.abs().max() > 0
        torch.testing.assert_close(g, theirs[n].flatten(), atol=1e-6, rtol=1e-5)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n  # frozen weights bit-identical


def test_gpt2_ia3_equals_peft_on_the_conv1d_model(tmp_path):
    """PEFT's GPT-2 defaults (c_attn's output, mlp.c_proj's input): ferrolm's GPT and
    transformers' own Conv1D model adapted by ferrolm both give PEFT's logits."""
    torch.manual_seed(2)
    hf_cfg = transformers.GPT2Config(vocab_size=80, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    hf = transformers.GPT2LMHeadModel(hf_cfg).eval()
    ours = GPT.from_hf_gpt2(hf).eval()
    names = apply_ia3(ours)
    assert names == [f"transformer.h.{i}.{m}" for i in (0, 1) for m in ("attn.c_attn", "mlp.c_proj")]
    _randomise(ours, seed=6)
    save_ia3(ours, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == ["c_attn", "mlp.c_proj"] and cfg["feedforward_modules"] == ["mlp.c_proj"]
    import copy

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PEFT warns that it sets fan_in_fan_out for Conv1D
        pm = peft.PeftModel.from_pretrained(copy.deepcopy(hf), str(tmp_path / "a")).eval()
    conv = copy.deepcopy(hf)
    load_ia3(conv, tmp_path / "a")  # ferrolm's (IA)³ on transformers' Conv1D layers
    with torch.no_grad():
        want = pm(IDX).logits
        assert (want - hf(IDX).logits).abs().max() > 1e-2
        torch.testing.assert_close(ours(IDX)[0], want, atol=1e-5, rtol=0)
        torch.testing.assert_close(conv(IDX).logits, want, atol=1e-5, rtol=0)
        merge_and_unload(conv)  # the Conv1D (in, out) layout merged
        torch.testing.assert_close(conv(IDX).logits, want, atol=1e-5, rtol=0)


def test_ia3_on_a_quantized_base_trains_and_matches_the_dequantized_model():
    from ferrolm.quant import QuantLinear, quantize

    hf = _hf(seed=7, intermediate_size=64)  # q8_0 blocks of 32 values per row
    q = quantize(Llama.from_hf(hf), "q8_0", head=None).eval()
    apply_ia3(q)
    assert isinstance(q.model.layers[0].self_attn.k_proj.base, QuantLinear)
    _randomise(q, seed=8)
    flt = Llama.from_hf(hf).eval()
    for n, m in q.named_modules():
        if isinstance(m, QuantLinear):
            flt.get_submodule(n.removesuffix(".base")).weight.data.copy_(m.dequantized_weight())
    apply_ia3(flt)
    _randomise(flt, seed=8)
    with torch.no_grad():
        got, want = q(IDX)[0], flt(IDX)[0]
        plain = Llama.from_hf(hf).eval()(IDX)[0]
    # equal up to the kernels' 8-bit activation rounding, far below the adapter's own effect
    err = (got - want).abs().max()
    assert err < 0.1 * (want - plain).abs().max(), err
    prepare(q, "ia3")
    q.train()
    q(IDX[:, :-1], targets=IDX[:, 1:])[1].backward()
    assert all((p.grad is not None) == n.endswith("ia3_l") for n, p in q.named_parameters())
    with pytest.raises(ValueError, match="cannot merge \\(IA\\)³ into a quantized base"):
        q.model.layers[0].self_attn.k_proj.merge()
    # greedy decoding (KV caches; the fused quantized step must not bypass the vectors) equals
    # the argmax of full forward passes
    from ferrolm.decoding import generate

    q.eval()
    prompt = IDX[0, :4].tolist()
    got = generate(q, [prompt], 6, temperature=0)[0]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(6):
            seq.append(int(q(torch.tensor([seq]))[0][0, -1].argmax()))
    assert got == seq[len(prompt) :]


def _saved(tmp_path, name="a"):
    model = Llama.from_hf(_hf()).eval()
    apply_ia3(model)
    _randomise(model)
    return save_ia3(model, tmp_path / name)


def test_bad_adapters_are_refused_and_leave_the_model_untouched(tmp_path):
    d = _saved(tmp_path)
    model = Llama.from_hf(_hf()).eval()
    with torch.no_grad():
        before = model(IDX)[0]

    def edit_config(**kv):
        cfg = json.loads((d / "adapter_config.json").read_text())
        cfg.update(kv)
        (d / "adapter_config.json").write_text(json.dumps(cfg))

    def edit_tensors(fn):
        t = load_file(str(d / "adapter_model.safetensors"))
        fn(t)
        save_file(t, str(d / "adapter_model.safetensors"))

    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_ia3(model, tmp_path / "nowhere")
    good_cfg = (d / "adapter_config.json").read_text()
    good_w = (d / "adapter_model.safetensors").read_bytes()
    cases = [
        (lambda: edit_config(peft_type="LORA"), FormatError, "'LORA' adapter; load_ia3 loads 'IA3'"),
        (lambda: edit_config(target_modules=[]), FormatError, "'target_modules' must be"),
        (lambda: edit_config(target_modules="(k_proj"), FormatError, "not a valid regular expression"),
        (
            lambda: edit_config(feedforward_modules=[]),
            ValueError,
            "down_proj has shape \\(1, 48\\); .* needs \\(32, 1\\)",
        ),
        (lambda: edit_config(target_modules=["k_proj"]), FormatError, "which target_modules"),
        (lambda: (d / "adapter_config.json").write_text("{"), FormatError, "not valid JSON"),
        (lambda: (d / "adapter_model.safetensors").write_bytes(b"junk"), FormatError, "not a valid safetensors"),
        (
            lambda: edit_tensors(lambda t: t.update({"base_model.model.lm_head.lora_A.weight": torch.ones(2, 2)})),
            FormatError,
            "unexpected key 'base_model.model.lm_head.lora_A.weight'",
        ),
        (
            lambda: edit_tensors(
                lambda t: t.update({"base_model.model.model.layers.0.self_attn.k_proj.ia3_l": torch.ones(8, 1)})
            ),
            ValueError,
            "k_proj has shape \\(8, 1\\); .* needs \\(16, 1\\)",
        ),
        (
            lambda: edit_tensors(
                lambda t: t.update(
                    {"base_model.model.model.layers.0.self_attn.k_proj.ia3_l": torch.full((16, 1), float("nan"))}
                )
            ),
            FormatError,
            "non-finite",
        ),
        (
            lambda: edit_tensors(
                lambda t: t.update({"base_model.model.model.layers.9.self_attn.k_proj.ia3_l": torch.ones(16, 1)})
            ),
            ValueError,
            "modules this model lacks: \\['model.layers.9.self_attn.k_proj'\\]",
        ),
    ]
    for corrupt, exc, msg in cases:
        corrupt()
        with pytest.raises(exc, match=msg):
            load_ia3(model, d)
        (d / "adapter_config.json").write_text(good_cfg)
        (d / "adapter_model.safetensors").write_bytes(good_w)
        assert not any(isinstance(m, IA3Linear) for m in model.modules())
    with torch.no_grad():
        torch.testing.assert_close(model(IDX)[0], before, atol=0, rtol=0)
    # a LoRA loader handed an (IA)³ adapter says which loader to use
    with pytest.raises(FormatError, match="'IA3' adapter; load_lora loads 'LORA' adapters \\(use load_ia3\\)"):
        load_lora(model, d)
    load_ia3(model, d)
    with pytest.raises(ValueError, match="already has LoRA or \\(IA\\)³ layers"):
        load_ia3(model, d)


def test_given_targets_keep_the_family_feedforward_layers(tmp_path):
    model = Llama.from_hf(_hf()).eval()
    names = apply_ia3(model, target_modules=["v_proj", "mlp.down_proj"])
    ff = sorted(n for n, m in model.named_modules() if isinstance(m, IA3Linear) and m.feedforward)
    assert len(names) == 4 and ff == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
    # as PEFT reads the same config
    pm = peft.get_peft_model(
        _hf(), peft.IA3Config(target_modules=["v_proj", "mlp.down_proj"], feedforward_modules=["mlp.down_proj"])
    )
    theirs = sorted(n for n, p in pm.named_parameters() if p.requires_grad)
    assert [n.replace("base_model.model.", "").replace(".ia3_l.default", "") for n in theirs] == sorted(names)
    _randomise(model, seed=9)
    _randomise(pm, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(model(IDX)[0], pm.eval()(IDX).logits, atol=1e-5, rtol=0)
    # saved, it loads in PEFT, whose config wants feedforward_modules to be a subset of target_modules by name
    save_ia3(model, tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert set(cfg["feedforward_modules"]) <= set(cfg["target_modules"])
    again = peft.PeftModel.from_pretrained(_hf(), str(tmp_path / "a")).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(IDX).logits, model(IDX)[0], atol=1e-5, rtol=0)


def test_apply_ia3_refuses_bad_arguments():
    model = Llama.from_hf(_hf()).eval()
    with pytest.raises(ValueError, match="match no nn.Linear; the model's linear layers are named"):
        apply_ia3(model, target_modules=["c_attn"])
    with pytest.raises(ValueError, match="feedforward_modules must be a subset of target_modules"):
        apply_ia3(model, target_modules=["k_proj"], feedforward_modules=["down_proj"])
    with pytest.raises(ValueError, match="no default \\(IA\\)³ modules for a Sequential"):
        apply_ia3(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="no \\(IA\\)³ layers"):
        prepare(model, "ia3")
    apply_lora(model, r=2, alpha=4, target_modules=["q_proj"])
    with pytest.raises(ValueError, match="LoRA and \\(IA\\)³ on one model are not supported"):
        apply_ia3(model)


def test_cli_finetune_ia3_writes_a_peft_adapter_and_the_merged_model(tmp_path):
    from ferrolm import cli
    from ferrolm.corpus import default_corpus
    from ferrolm.models import LlamaConfig
    from ferrolm.tokenizer import Tokenizer

    tok = Tokenizer.train(default_corpus(100_000), vocab_size=300)
    base_dir = tmp_path / "base"
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=tok.n_vocab, block_size=64, n_layer=1, n_head=2, n_embd=16, ff_size=32)
    Llama(cfg).save_pretrained(base_dir)
    tok.save_hf_json(base_dir / "tokenizer.json")
    out = tmp_path / "ft"
    argv = ["finetune", "--method", "ia3", "--model", str(base_dir), "--out", str(out), "--steps", "3"]
    assert cli.main(argv + ["--batch-size", "2", "--seq-len", "32", "--lr", "0.05", "--checkpoint-interval", "0"]) == 0
    base = Llama.from_pretrained(base_dir).eval()
    load_ia3(base, out / "adapter")
    vectors = [m.ia3_l for m in base.modules() if isinstance(m, IA3Linear)]
    assert len(vectors) == 3 and all((v - 1).abs().max() > 1e-3 for v in vectors)  # trained away from ones
    idx = torch.randint(0, tok.n_vocab, (2, 12))
    pm = peft.PeftModel.from_pretrained(Llama.from_pretrained(base_dir).to_hf().eval(), str(out / "adapter")).eval()
    with torch.no_grad():
        want = pm(idx).logits
        torch.testing.assert_close(base(idx)[0], want, atol=1e-5, rtol=0)
        torch.testing.assert_close(load_model(out / "model.safetensors").eval()(idx)[0], want, atol=1e-5, rtol=0)
