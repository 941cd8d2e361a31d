"""ferrolm.models against their plain-PyTorch twins in ferrolm.testing.reference (same weights), GPT-2
parity with transformers, checkpoints and bad input."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")

from ferrolm import FormatError
from ferrolm.models import (  # noqa: E402
    GPT,
    ClassifierConfig,
    GPTConfig,
    LSTMConfig,
    LSTMLanguageModel,
    SequenceClassifier,
    config_from_dict,
    load_model,
    save_model,
)
from ferrolm.testing import reference  # noqa: E402


def _twin(model, ref_cls):
    ref = ref_cls(model.config)
    ref.load_state_dict(model.state_dict())
    return ref


def _assert_grads_match(a, b, rtol=1e-4, atol=1e-5):
    pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
    assert pa.keys() == pb.keys()
    for name in pa:
        ga, gb = pa[name].grad, pb[name].grad
        assert (ga is None) == (gb is None), name
        if ga is not None:
            torch.testing.assert_close(ga, gb, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


def tiny_gpt(**kw) -> GPTConfig:
    base = dict(vocab_size=97, block_size=32, n_layer=2, n_head=4, n_embd=32)
    base.update(kw)
    return GPTConfig(**base)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"positions": "sinusoidal"},
        {"positions": "rotary", "n_kv_head": 2},
        {"positions": "rotary", "bias": False, "tie_weights": False},
        {"n_layer": 1, "n_head": 1, "n_embd": 24},
        {"mlp": False},  # attention-only blocks
    ],
)
def test_gpt_matches_reference_logits_and_gradients(kw):
    torch.manual_seed(0)
    model = GPT(tiny_gpt(**kw))
    ref = _twin(model, reference.GPT)
    idx = torch.randint(0, 97, (3, 19))
    targets = torch.randint(0, 97, (3, 19))
    targets[1, 5:] = -100
    la, loss_a = model(idx, targets)
    lb, loss_b = ref(idx, targets)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    loss_a.backward()
    loss_b.backward()
    _assert_grads_match(model, ref)


def test_inputs_embeds_equal_the_token_path():
    torch.manual_seed(0)
    gpt = GPT(tiny_gpt(positions="rotary"))
    lstm = LSTMLanguageModel(LSTMConfig(vocab_size=97, n_embd=24, hidden_size=16, num_layers=2))
    idx = torch.randint(0, 97, (3, 11))
    lengths = torch.tensor([11, 7, 3])
    torch.testing.assert_close(
        gpt.hidden_states(None, lengths=lengths, inputs_embeds=gpt.transformer.wte(idx)),
        gpt.hidden_states(idx, lengths=lengths),
        rtol=0,
        atol=0,
    )
    torch.testing.assert_close(
        lstm.hidden_states(None, lengths=lengths, inputs_embeds=lstm.embed(idx)),
        lstm.hidden_states(idx, lengths=lengths),
        rtol=0,
        atol=0,
    )
    assert (
        len(dict(GPT(tiny_gpt(mlp=False)).named_parameters())) == len(dict(GPT(tiny_gpt()).named_parameters())) - 2 * 6
    )
    for model in (gpt, lstm):
        with pytest.raises(ValueError, match="not both"):
            model.hidden_states(idx, inputs_embeds=torch.zeros(3, 11, 24 if model is lstm else 32))
        with pytest.raises(ValueError, match="inputs_embeds must be"):
            model.hidden_states(None, inputs_embeds=torch.zeros(3, 11, 5))
        with pytest.raises(ValueError, match="give idx"):
            model.hidden_states(None)


@pytest.mark.parametrize("positions", ["learned", "rotary"])
def test_gpt_left_padding_gives_each_row_its_own_positions(positions):
    torch.manual_seed(1)
    model = GPT(tiny_gpt(positions=positions)).eval()
    ref = _twin(model, reference.GPT).eval()
    short = torch.randint(0, 97, (1, 5))
    long = torch.randint(0, 97, (1, 9))
    idx = torch.zeros(2, 9, dtype=torch.long)
    idx[0, 4:] = short
    idx[1] = long
    pad = torch.zeros(2, 9, dtype=torch.bool)
    pad[0, :4] = True
    la, _ = model(idx, padding_mask=pad)
    lb, _ = ref(idx, padding_mask=pad)
    torch.testing.assert_close(la[~pad], lb[~pad], rtol=1e-5, atol=1e-5)
    alone, _ = model(short)
    torch.testing.assert_close(la[0, 4:], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cell,tie,layers", [("lstm", False, 2), ("lstm", True, 1), ("gru", False, 2)])
def test_lstm_lm_matches_reference(cell, tie, layers):
    torch.manual_seed(2)
    cfg = LSTMConfig(
        vocab_size=61, n_embd=24, hidden_size=24 if tie else 40, num_layers=layers, tie_weights=tie, cell=cell
    )
    model = LSTMLanguageModel(cfg)
    ref = _twin(model, reference.LSTMLanguageModel)
    idx = torch.randint(0, 61, (4, 11))
    targets = torch.randint(0, 61, (4, 11))
    lengths = torch.tensor([11, 3, 7, 11])
    for lens in (None, lengths):
        model.zero_grad()
        ref.zero_grad()
        la, loss_a = model(idx, targets, lengths=lens)
        lb, loss_b = ref(idx, targets, lengths=lens)
        torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
        loss_a.backward()
        loss_b.backward()
        _assert_grads_match(model, ref)


@pytest.mark.parametrize("pooling", ["last", "mean", "max", "first"])
@pytest.mark.parametrize("backbone", ["gpt", "lstm"])
def test_classifier_matches_reference(pooling, backbone):
    torch.manual_seed(3)
    bc = tiny_gpt() if backbone == "gpt" else LSTMConfig(vocab_size=97, n_embd=16, hidden_size=32, num_layers=2)
    model = SequenceClassifier(ClassifierConfig(bc, num_classes=3, pooling=pooling))
    ref = _twin(model, reference.SequenceClassifier)
    idx = torch.randint(0, 97, (4, 10))
    lengths = torch.tensor([10, 4, 7, 1])
    labels = torch.tensor([0, 2, 1, 2])
    la, loss_a = model(idx, labels, lengths=lengths)
    lb, loss_b = ref(idx, labels, lengths=lengths)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
    loss_a.backward()
    loss_b.backward()
    _assert_grads_match(model, ref)


def test_classifier_on_pretrained_backbone_keeps_its_weights():
    lm = GPT(tiny_gpt())
    clf = SequenceClassifier.from_backbone(lm, num_classes=4, pooling="mean")
    assert clf.backbone is lm
    logits, _ = clf(torch.randint(0, 97, (2, 6)))
    assert logits.shape == (2, 4)


# --------------------------------------------------------------------------- Hugging Face GPT-2


def _hf_gpt2(tie=True):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(4)
    cfg = transformers.GPT2Config(
        vocab_size=211,
        n_positions=48,
        n_embd=48,
        n_layer=3,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        tie_word_embeddings=tie,
    )
    hf = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():  # make biases and norms non-trivial so a wrong mapping shows
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return hf


@pytest.mark.parametrize("tie", [True, False])
def test_from_hf_gpt2_gives_transformers_logits(tie):
    hf = _hf_gpt2(tie)
    model = GPT.from_hf_gpt2(hf).eval()
    assert model.config.tie_weights is tie
    idx = torch.randint(0, 211, (2, 40))
    with torch.no_grad():
        want = hf(idx).logits
        got, _ = model(idx)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    # From a bare state dict too (heads given), and back to transformers.
    model2 = GPT.from_hf_gpt2(hf.state_dict(), n_head=4).eval()
    with torch.no_grad():
        torch.testing.assert_close(model2(idx)[0], want, rtol=1e-4, atol=1e-4)
        back = model.to_hf_gpt2().eval()
        torch.testing.assert_close(back(idx).logits, want, rtol=1e-4, atol=1e-4)


def test_from_hf_gpt2_errors():
    hf = _hf_gpt2()
    with pytest.raises(ValueError, match="n_head"):
        GPT.from_hf_gpt2(hf.state_dict())
    with pytest.raises(ValueError, match="not a GPT-2 state dict"):
        GPT.from_hf_gpt2({"foo": torch.zeros(3)}, n_head=2)
    hf.config.activation_function = "relu"
    with pytest.raises(ValueError, match="activation"):
        GPT.from_hf_gpt2(hf)


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(
    "make",
    [
        lambda: GPT(tiny_gpt(positions="rotary", n_kv_head=1)),
        lambda: LSTMLanguageModel(LSTMConfig(vocab_size=50, n_embd=16, hidden_size=16, tie_weights=True)),
        lambda: SequenceClassifier(ClassifierConfig(LSTMConfig(vocab_size=50, n_embd=8, hidden_size=8), num_classes=5)),
    ],
)
def test_checkpoint_roundtrip(tmp_path, make):
    torch.manual_seed(5)
    model = make().eval()
    path = tmp_path / "m.safetensors"
    save_model(model, path)
    loaded = type(model).load(path).eval()
    assert loaded.config == model.config
    for (ka, va), (kb, vb) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert ka == kb
        assert torch.equal(va, vb)
    if getattr(model.config, "tie_weights", False):
        first = loaded.lm_head.weight if isinstance(loaded, GPT) else loaded.head.weight
        assert (
            first.data_ptr()
            == (loaded.transformer.wte.weight if isinstance(loaded, GPT) else loaded.embed.weight).data_ptr()
        )
    idx = torch.randint(0, 50, (2, 7))
    torch.testing.assert_close(model(idx)[0], loaded(idx)[0], rtol=0, atol=0)
    assert not list(tmp_path.glob(".*tmp")), "temporary file left behind"


def test_checkpoint_errors(tmp_path):
    gpt = GPT(tiny_gpt())
    path = tmp_path / "gpt.safetensors"
    gpt.save(path)
    with pytest.raises(ValueError, match="holds a GPT"):
        LSTMLanguageModel.load(path)
    assert isinstance(load_model(path), GPT)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    with pytest.raises(FormatError):
        load_model(bad)
    with pytest.raises(FileNotFoundError):
        load_model(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"x": torch.zeros(2)}, plain)
    with pytest.raises(FormatError, match="not a ferrolm model checkpoint"):
        load_model(plain)
    sd = gpt.state_dict()
    sd.pop("transformer.ln_f.weight")
    sd["extra.weight"] = torch.zeros(1)
    with pytest.raises(
        ValueError, match=r"missing keys \['transformer.ln_f.weight'\].*unexpected keys \['extra.weight'\]"
    ):
        GPT(tiny_gpt()).load_state_dict(sd)
    with pytest.raises(ValueError, match="shape mismatches"):
        GPT(tiny_gpt(n_embd=16)).load_state_dict(gpt.state_dict())


def test_config_errors():
    with pytest.raises(ValueError, match=r"unknown GPTConfig keys \['n_layers'\]"):
        GPTConfig.from_dict({"n_layers": 3})
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="positions"):
        GPTConfig(positions="alibi")
    with pytest.raises(ValueError, match="tie_weights"):
        LSTMConfig(n_embd=8, hidden_size=16, tie_weights=True)
    with pytest.raises(ValueError, match="architecture"):
        config_from_dict({"n_layer": 2})
    cfg = ClassifierConfig(tiny_gpt(), num_classes=3)
    assert config_from_dict(json.loads(json.dumps({"architecture": "classifier", **cfg.to_dict()}))) == cfg


def test_bad_input_errors():
    model = GPT(tiny_gpt())
    with pytest.raises(ValueError, match="token id 97 .* out of range for vocab_size=97"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="token id -1"):
        model(torch.tensor([[-1, 2]]))
    with pytest.raises(ValueError, match="exceeds block_size=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
    with pytest.raises(TypeError, match="integer token ids"):
        model(torch.zeros(1, 3))
    with pytest.raises(ValueError, match="2-D"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="targets have shape"):
        model(torch.zeros(1, 3, dtype=torch.long), targets=torch.zeros(1, 4, dtype=torch.long))
    lstm = LSTMLanguageModel(LSTMConfig(vocab_size=10, n_embd=4, hidden_size=4))
    with pytest.raises(ValueError, match="lengths must be in"):
        lstm(torch.zeros(2, 3, dtype=torch.long), lengths=[4, 1])


@pytest.mark.parametrize("kind", ["gpt", "lstm"])
def test_delegated_path_equals_reference(kind):
    """Dtypes the Rust kernels do not take (here bfloat16 on CPU) go through torch's own
    kernels, the same path CUDA tensors take: results equal the plain-torch twin's."""
    from ferrolm.decoding import generate

    torch.manual_seed(6)
    model = (
        GPT(tiny_gpt(positions="rotary"))
        if kind == "gpt"
        else LSTMLanguageModel(LSTMConfig(vocab_size=97, n_embd=16, hidden_size=16))
    )
    ref = _twin(model, reference.GPT if kind == "gpt" else reference.LSTMLanguageModel)
    model, ref = model.to(torch.bfloat16), ref.to(torch.bfloat16)
    idx = torch.randint(0, 97, (2, 9))
    torch.testing.assert_close(model(idx)[0], ref(idx)[0], rtol=2e-2, atol=1e-2)  # bf16 rounding
    out = generate(model, [[1, 2, 3], [4]], 4, temperature=0)
    assert [len(o) for o in out] == [4, 4]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_models_run_on_cuda():
    from ferrolm.decoding import generate

    torch.manual_seed(7)
    model = GPT(tiny_gpt())
    ref = _twin(model, reference.GPT)
    idx = torch.randint(0, 97, (2, 9))
    want = ref(idx)[0]
    got = model.cuda()(idx.cuda())[0].cpu()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    assert generate(model, [[1, 2, 3]], 5, temperature=0) == generate(model.cpu(), [[1, 2, 3]], 5, temperature=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_runs_on_cuda():
    import numpy as np

    from ferrolm.training import TrainConfig, train

    model = LSTMLanguageModel(LSTMConfig(vocab_size=64, n_embd=16, hidden_size=16)).cuda()
    tokens = np.random.default_rng(0).integers(0, 64, 5_000)
    result = train(
        model,
        tokens,
        tokens,
        TrainConfig(max_steps=3, batch_size=2, seq_len=16, eval_interval=3, eval_batches=1, progress=False),
    )
    assert result.step == 3 and next(model.parameters()).is_cuda
