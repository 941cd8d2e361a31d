"""LoRA on a Llama in PEFT's layout, both ways: a ferrolm adapter loads with
``peft.PeftModel.from_pretrained`` on the matching transformers ``LlamaForCausalLM`` (same
logits), and PEFT's adapter loads into ferrolm with ``load_lora`` (same logits)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from ferrolm.finetune import apply_lora, load_lora, merge_and_unload, save_lora  # noqa: E402
from ferrolm.models import Llama  # noqa: E402
from ferrolm.recipes.language_model import LORA_TARGETS  # noqa: E402

TARGETS = list(LORA_TARGETS["llama"])


def _hf(seed: int = 0, tie: bool = False):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


IDX = torch.tensor([[3, 14, 15, 9, 26, 5, 35], [8, 9, 7, 9, 3, 2, 38]])


@pytest.mark.parametrize("tie", [False, True])
def test_ferrolm_lora_loads_in_peft(tmp_path, tie):
    hf = _hf(tie=tie)
    model = Llama.from_hf(hf).eval()
    names = apply_lora(model, r=4, alpha=8.0, target_modules=TARGETS)
    assert len(names) == 2 * 7
    torch.manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    save_lora(model, tmp_path / "adapter")
    pm = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        want = pm(IDX).logits
        got = model(IDX)[0]
        base = Llama.from_hf(_hf(tie=tie)).eval()(IDX)[0]
    assert (want - base).abs().max() > 1e-2  # the adapter changes the outputs
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    merge_and_unload(model)
    with torch.no_grad():
        torch.testing.assert_close(model(IDX)[0], want, atol=1e-5, rtol=0)


def test_peft_lora_loads_in_ferrolm(tmp_path):
    hf = _hf(seed=2)
    model = Llama.from_hf(hf).eval()
    cfg = peft.LoraConfig(r=4, lora_alpha=16, target_modules=TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM")
    pm = peft.get_peft_model(hf, cfg)
    torch.manual_seed(3)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    pm.eval()
    pm.save_pretrained(str(tmp_path / "peft"))
    names = load_lora(model, tmp_path / "peft")
    assert len(names) == 2 * 7 and all(n.split(".")[-1] in TARGETS for n in names)
    with torch.no_grad():
        torch.testing.assert_close(model(IDX)[0], pm(IDX).logits, atol=1e-5, rtol=0)


def test_prompt_tuning_on_a_llama():
    from ferrolm.decoding import generate
    from ferrolm.finetune import PromptTuning, prepare, trainable_parameters

    model = Llama.from_hf(_hf(seed=4)).eval()
    init = [5, 9, 11]
    pt = PromptTuning(model, 3, init_ids=init).eval()
    # Virtual tokens initialised from ids 5, 9, 11 == running those ids as real tokens first.
    with torch.no_grad():
        full = model(torch.cat([torch.tensor([init, init]), IDX], 1))[0]
        torch.testing.assert_close(pt(IDX)[0], full[:, 3:], atol=1e-5, rtol=0)
    got = generate(pt, [IDX[0].tolist()], 5, temperature=0)[0]
    want = generate(model, [init + IDX[0].tolist()], 5, temperature=0)[0]
    assert got == want
    prepare(pt, "prompt")
    assert trainable_parameters(pt)[0] == 3 * 32
