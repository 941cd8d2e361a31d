"""No command loses or mixes a user's files, and no input is silently wrong (issue #24):
rejected runs leave ``--out`` as it was, a locked output folder names its holder, a checkpoint is
one unit, LoRA adapters are checked whole before the model is touched, a LoRA model saves as a
checkpoint that loads, files keep the umask's mode, CSV rows and data files with bad cells or
bad UTF-8 are errors naming ``file:line``. Each family asserts the exception type and that the
message names the argument or the file."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from ferrolm import FormatError, Tokenizer  # noqa: E402
from ferrolm._io import LOCK_FILE, FolderLockedError, atomic_write, folder_lock, read_text  # noqa: E402
from ferrolm.cli import main  # noqa: E402
from ferrolm.finetune import LoRALinear, apply_lora, apply_lora_rnn, load_lora, merge_lora, save_lora  # noqa: E402
from ferrolm.icl import Example, Template, load_examples  # noqa: E402
from ferrolm.models import GPT, GPTConfig, LSTMConfig, LSTMLanguageModel, load_model  # noqa: E402
from ferrolm.training import TrainConfig, load_train_state, train  # noqa: E402
from ferrolm.training import state as state_mod  # noqa: E402

TEXT = "the cat sat on the mat. the dog ate the bone. a bird sang in the tree.\n" * 40


def snapshot(folder: Path) -> Dict[str, bytes]:
    """Every file under ``folder`` by relative path, with its bytes (absent folder: empty)."""
    if not folder.exists():
        return {}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(argv: List[str], capsys) -> tuple:
    """``(exit code, stdout, stderr)`` of ``ferrolm argv`` in this process."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_one_error_line(code, err: str, *names: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith("training a ")]
    assert len(lines) == 1 and lines[0].startswith("ferrolm: error: "), err
    for name in names:
        assert name in lines[0], (name, err)


# --------------------------------------------------------------------------- ferrolm train


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("corpus") / "text.txt"
    p.write_text(TEXT, encoding="utf-8")
    return p


SMALL = ["--vocab-size", "300", "--batch-size", "2", "--seq-len", "16", "--n-layer", "1", "--n-embd", "16"]

#: (extra arguments, text the error must contain): each is refused before any work.
REJECTED_TRAIN = [
    (["--steps", "-1"], "--steps"),
    (["--steps", "0"], "--steps"),
    (["--n-head", "3"], "n_head=3"),
    (["--seq-len", "0"], "--seq-len"),
    (["--batch-size", "-4"], "--batch-size"),
    (["--grad-accum", "0"], "--grad-accum"),
    (["--lr", "nan"], "--lr"),
    (["--lr", "0"], "--lr"),
    (["--lr", "-1e-3"], "--lr"),
    (["--dropout", "1.5"], "--dropout"),
    (["--dropout", "nan"], "--dropout"),
    (["--val-fraction", "1"], "--val-fraction"),
    (["--max-bytes", "-5"], "--max-bytes"),
    (["--max-bytes", "0"], "--max-bytes"),
    (["--vocab-size", "-1"], "--vocab-size"),
    (["--vocab-size", "0"], "--vocab-size"),
    (["--eval-batches", "0"], "--eval-batches"),
    (["--warmup", "-1"], "--warmup"),
    (["--checkpoint-interval", "-1"], "--checkpoint-interval"),
    (["--positions", "bogus"], "--positions"),
    (["--n-embd", "15", "--positions", "sinusoidal", "--n-head", "1"], "even n_embd"),
    (["--tokenizer", "MISSING/tok.json"], "tok.json"),
    (["--seq-len", "4096"], "too few"),
]


@pytest.mark.parametrize("extra,names", REJECTED_TRAIN, ids=[" ".join(a) for a, _ in REJECTED_TRAIN])
@pytest.mark.parametrize("fresh", [False, True], ids=["existing-out", "new-out"])
def test_a_rejected_train_leaves_out_as_it_was(tmp_path, capsys, corpus, extra, names, fresh):
    out = tmp_path / "out"
    if not fresh:
        out.mkdir()
        (out / "tokenizer.json").write_text("the tokenizer of an earlier run")
        (out / "model.safetensors").write_bytes(b"the model of an earlier run")
        (out / "notes.txt").write_text("mine")
    before = snapshot(out)
    extra = [str(tmp_path / a) if a.startswith("MISSING") else a for a in extra]
    code, _, err = run_cli(["train", "gpt", corpus, "--out", out, *SMALL, "--steps", "2", *extra], capsys)
    assert_one_error_line(code, err, names)
    assert snapshot(out) == before
    assert out.exists() != fresh  # a new --out is not even created


@pytest.mark.parametrize(
    "extra,names",
    [
        (["--hidden-size", "0"], "--hidden-size"),
        (["--num-layers", "-1"], "--num-layers"),
        (["--cell", "rnn"], "--cell"),
    ],
)
def test_a_rejected_lstm_train_leaves_out_as_it_was(tmp_path, capsys, corpus, extra, names):
    out = tmp_path / "out"
    code, _, err = run_cli(["train", "lstm", corpus, "--out", out, *SMALL, *extra], capsys)
    assert_one_error_line(code, err, names)
    assert not out.exists()


def test_resume_without_a_checkpoint_writes_nothing(tmp_path, capsys, corpus):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = run_cli(["train", "gpt", corpus, "--out", out, *SMALL, "--resume"], capsys)
    assert_one_error_line(code, err, "model.safetensors")
    assert snapshot(out) == {"notes.txt": b"mine"}
    (out / "model.safetensors").write_bytes(b"x")
    code, _, err = run_cli(["train", "gpt", corpus, "--out", out, *SMALL, "--resume"], capsys)
    assert_one_error_line(code, err, "tokenizer.json")
    assert snapshot(out) == {"notes.txt": b"mine", "model.safetensors": b"x"}


def test_train_data_with_invalid_utf8_names_the_file_and_line(tmp_path, capsys, corpus):
    tok = Tokenizer.train([TEXT], vocab_size=300, special_tokens=["<|endoftext|>"])
    tok.save_hf_json(tmp_path / "tok.json")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"fine line\nsecond line\nthird \xff\xfe line\n")
    out = tmp_path / "out"
    code, _, err = run_cli(["train", "gpt", bad, "--tokenizer", tmp_path / "tok.json", "--out", out, *SMALL], capsys)
    assert_one_error_line(code, err, f"{bad}:3", "UTF-8")
    assert not out.exists()


# --------------------------------------------------------------------------- the folder lock

HOLDER = textwrap.dedent(
    """
    import sys, time
    from ferrolm._io import folder_lock
    with folder_lock(sys.argv[1]):
        print("locked", flush=True)
        time.sleep(120)
    """
)


@pytest.fixture
def locked_folder(tmp_path):
    """A folder locked by another process: ``(folder, its pid)``."""
    folder = tmp_path / "busy"
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        yield folder, proc.pid
    finally:
        proc.kill()
        proc.wait()


def tiny_gpt(vocab_size: int = 64) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab_size, block_size=16, n_layer=1, n_head=2, n_embd=16))


def tiny_train(steps: int = 2, **kw) -> TrainConfig:
    return TrainConfig(max_steps=steps, batch_size=2, seq_len=16, progress=False, **kw)


TOKENS = np.random.default_rng(0).integers(0, 64, 5_000)


def test_a_second_run_into_a_locked_folder_is_refused_naming_the_holder(locked_folder, capsys, corpus):
    folder, pid = locked_folder
    before = snapshot(folder)
    with pytest.raises(FolderLockedError, match=f"pid {pid}"):
        train(tiny_gpt(), TOKENS, config=tiny_train(), out_dir=folder)
    assert isinstance(FolderLockedError("x"), OSError)
    code, _, err = run_cli(["train", "gpt", corpus, "--out", folder, *SMALL, "--steps", "1"], capsys)
    assert_one_error_line(code, err, f"pid {pid}", str(folder))
    assert snapshot(folder) == before


def test_the_lock_is_released_and_reentrant(tmp_path):
    with folder_lock(tmp_path) as f:
        with folder_lock(tmp_path):  # the same process may nest (a recipe around train())
            pass
        assert (f / LOCK_FILE).read_text() == str(os.getpid())
        result = train(tiny_gpt(), TOKENS, config=tiny_train(), out_dir=tmp_path)
    assert result.step == 2
    proc = subprocess.run([sys.executable, "-c", HOLDER.replace("time.sleep(120)", "pass"), str(tmp_path)])
    assert proc.returncode == 0  # free again for another process


def test_a_dead_holder_leaves_no_stale_lock(tmp_path):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with folder_lock(tmp_path):
        pass


# --------------------------------------------------------------------------- checkpoints


def model_step(folder: Path) -> int:
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        return int(f.metadata()["step"])


def test_both_checkpoint_files_carry_the_same_step(tmp_path):
    train(tiny_gpt(), TOKENS, config=tiny_train(5, checkpoint_interval=2), out_dir=tmp_path)
    assert load_train_state(tmp_path)["step"] == model_step(tmp_path) == 5
    assert not (tmp_path / state_mod.PENDING_DIR).exists()


@pytest.mark.parametrize("fail_in", ["save_model", "torch.save"])
def test_an_interrupted_save_keeps_the_previous_pair(tmp_path, monkeypatch, fail_in):
    model = tiny_gpt()
    train(model, TOKENS, config=tiny_train(2), out_dir=tmp_path)
    before = snapshot(tmp_path)

    def interrupted(*a, **k):
        raise KeyboardInterrupt  # a second Ctrl-C (or a kill) in the middle of the save

    if fail_in == "save_model":
        monkeypatch.setattr(state_mod, "save_model", interrupted)
    else:
        monkeypatch.setattr(state_mod.torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train(model, TOKENS, config=tiny_train(4), out_dir=tmp_path, resume=True)
    monkeypatch.undo()
    assert load_train_state(tmp_path)["step"] == model_step(tmp_path) == 2
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.startswith(".")} == {
        k: v for k, v in before.items() if not k.startswith(".")
    }


def test_a_crash_after_the_commit_marker_is_rolled_forward(tmp_path, monkeypatch):
    model = tiny_gpt()
    train(model, TOKENS, config=tiny_train(2), out_dir=tmp_path)
    real = os.replace
    calls = []

    def crash_after_first(src, dst):
        if Path(src).parent.name == state_mod.PENDING_DIR and Path(dst).parent == tmp_path:
            calls.append(dst)  # the commit's renames: the first goes through, the power fails at the second
            if len(calls) == 2:
                raise OSError("power cut")
        return real(src, dst)

    monkeypatch.setattr(state_mod.os, "replace", crash_after_first)
    with pytest.raises(OSError, match="power cut"):
        train(model, TOKENS, config=tiny_train(3), out_dir=tmp_path, resume=True)
    monkeypatch.undo()
    assert (tmp_path / state_mod.PENDING_DIR / state_mod.COMMIT_FILE).is_file()
    assert load_train_state(tmp_path)["step"] == model_step(tmp_path) == 3  # finished on the next read
    assert not (tmp_path / state_mod.PENDING_DIR).exists()


def test_a_pending_checkpoint_without_its_marker_is_discarded(tmp_path):
    train(tiny_gpt(), TOKENS, config=tiny_train(2), out_dir=tmp_path)
    pending = tmp_path / state_mod.PENDING_DIR
    pending.mkdir()
    (pending / "train_state.pt").write_bytes(b"half written")
    assert load_train_state(tmp_path)["step"] == 2
    assert not pending.exists()


def test_ctrl_c_during_a_checkpoint_waits_for_it(tmp_path, monkeypatch):
    model = tiny_gpt()
    real = state_mod.save_model

    def save_and_press_ctrl_c(*a, **k):
        os.kill(os.getpid(), signal.SIGINT)  # lands in the middle of the save
        return real(*a, **k)

    monkeypatch.setattr(state_mod, "save_model", save_and_press_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        _shielded_save(tmp_path, model)
    monkeypatch.undo()
    assert load_train_state(tmp_path)["step"] == model_step(tmp_path) == 7


def _shielded_save(folder: Path, model) -> None:
    with state_mod.sigint_deferred():
        state_mod.save_checkpoint(
            folder, model, torch.optim.AdamW(model.parameters()), 7, tiny_train(), {}, state_mod.TrainResult()
        )


# --------------------------------------------------------------------------- file modes


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002, 0o027])
def test_new_files_follow_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "a.bin", b"x")
        tiny_gpt().save(tmp_path / "m.safetensors")
    finally:
        os.umask(old)
    for name in ("a.bin", "m.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


def test_an_overwritten_file_keeps_its_mode(tmp_path):
    p = tmp_path / "a.bin"
    p.write_bytes(b"old")
    p.chmod(0o640)
    atomic_write(p, b"new")
    assert p.read_bytes() == b"new" and stat.S_IMODE(p.stat().st_mode) == 0o640


# --------------------------------------------------------------------------- LoRA adapters


@pytest.fixture
def adapter(tmp_path):
    """``(folder of a good adapter, the LoRA model it came from)``: r=4 on c_attn, B random."""
    model = tiny_gpt()
    apply_lora(model, r=4, alpha=8, target_modules=["c_attn", "c_fc"])
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_B.weight.normal_()
    return save_lora(model, tmp_path / "good"), model


def _edit_config(**changes):
    def edit(d: Path) -> None:
        cfg = json.loads((d / "adapter_config.json").read_text())
        for k, v in changes.items():
            if v is _DROP:
                cfg.pop(k)
            else:
                cfg[k] = v
        (d / "adapter_config.json").write_text(json.dumps(cfg))

    return edit


def _edit_tensors(fn):
    def edit(d: Path) -> None:
        from safetensors.torch import load_file

        tensors = fn(load_file(str(d / "adapter_model.safetensors")))
        save_file(tensors, str(d / "adapter_model.safetensors"))

    return edit


def _write(name: str, data: bytes):
    def edit(d: Path) -> None:
        (d / name).write_bytes(data)

    return edit


_DROP = object()
_A = "base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"
_B = "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"

#: (case, edit of the good adapter, exception type, text the message must contain)
BAD_ADAPTERS = [
    ("config r below the tensors", _edit_config(r=2), FormatError, "r=2"),
    ("config r above the tensors", _edit_config(r=8), FormatError, "r=8"),
    ("config r missing", _edit_config(r=_DROP), FormatError, "'r'"),
    ("config r a string", _edit_config(r="4"), FormatError, "'r'"),
    ("config r zero", _edit_config(r=0), FormatError, "'r'"),
    ("config r negative", _edit_config(r=-4), FormatError, "'r'"),
    ("config r a bool", _edit_config(r=True), FormatError, "'r'"),
    ("config r a float", _edit_config(r=4.0), FormatError, "'r'"),
    ("config alpha missing", _edit_config(lora_alpha=_DROP), FormatError, "lora_alpha"),
    ("config alpha negative", _edit_config(lora_alpha=-1), FormatError, "lora_alpha"),
    ("config alpha a string", _edit_config(lora_alpha="16"), FormatError, "lora_alpha"),
    ("config alpha nan", _edit_config(lora_alpha=float("nan")), FormatError, "lora_alpha"),
    ("config dropout 1.5", _edit_config(lora_dropout=1.5), FormatError, "lora_dropout"),
    ("config another peft type", _edit_config(peft_type="PREFIX_TUNING"), FormatError, "PREFIX_TUNING"),
    ("config bias all", _edit_config(bias="all"), ValueError, "bias"),
    ("config not json", _write("adapter_config.json", b"{r: 4"), FormatError, "adapter_config.json"),
    ("config a list", _write("adapter_config.json", b"[4, 8]"), FormatError, "adapter_config.json"),
    ("config a number", _write("adapter_config.json", b"4"), FormatError, "adapter_config.json"),
    ("config empty", _write("adapter_config.json", b""), FormatError, "adapter_config.json"),
    ("config invalid utf-8", _write("adapter_config.json", b'{"r": "\xff"}'), FormatError, "adapter_config.json"),
    ("weights garbage", _write("adapter_model.safetensors", b"garbage"), FormatError, "adapter_model.safetensors"),
    ("weights empty", _write("adapter_model.safetensors", b""), FormatError, "adapter_model.safetensors"),
    (
        "weights huge header length",
        _write("adapter_model.safetensors", (2**62).to_bytes(8, "little") + b"{}"),
        FormatError,
        "adapter_model.safetensors",
    ),
    ("lora_B missing", _edit_tensors(lambda t: {k: v for k, v in t.items() if k != _B}), FormatError, "lora_B"),
    ("lora_A missing", _edit_tensors(lambda t: {k: v for k, v in t.items() if k != _A}), FormatError, "lora_A"),
    ("no factors", _edit_tensors(lambda t: {"base_model.model.x": torch.zeros(1)}), FormatError, "unexpected key"),
    (
        "integer factors",
        _edit_tensors(lambda t: {**t, _A: t[_A].to(torch.int32)}),
        FormatError,
        "float",
    ),
    ("3-D factor", _edit_tensors(lambda t: {**t, _A: t[_A][None]}), FormatError, "2-D"),
    ("inconsistent ranks", _edit_tensors(lambda t: {**t, _A: t[_A][:2]}), FormatError, "rank"),
    ("wrong input width", _edit_tensors(lambda t: {**t, _A: torch.zeros(4, 99)}), ValueError, "do not fit"),
    ("wrong output width", _edit_tensors(lambda t: {**t, _B: torch.zeros(7, 4)}), ValueError, "do not fit"),
    (
        "a module the model lacks",
        _edit_tensors(
            lambda t: {**t, _A.replace("h.0", "h.9"): t[_A].clone(), _B.replace("h.0", "h.9"): t[_B].clone()}
        ),
        ValueError,
        "h.9",
    ),
    ("weights missing", lambda d: (d / "adapter_model.safetensors").unlink(), FileNotFoundError, "adapter_model"),
]


@pytest.mark.parametrize("case,edit,exc,text", BAD_ADAPTERS, ids=[c[0] for c in BAD_ADAPTERS])
def test_a_refused_adapter_leaves_the_model_untouched(tmp_path, adapter, case, edit, exc, text):
    import shutil

    good, lora_model = adapter
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    edit(bad)
    model = tiny_gpt()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(exc) as info:
        load_lora(model, bad)
    assert text in str(info.value)
    after = model.state_dict()
    assert sorted(after) == sorted(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    load_lora(model, good)  # a retry with a good adapter works and gives the adapter's outputs
    idx = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(model(idx)[0], lora_model(idx)[0])


# --------------------------------------------------------------------------- save after LoRA


@pytest.mark.parametrize("how", ["apply_lora", "merged", "load_lora", "apply_lora_rnn"])
def test_a_lora_model_saves_merged_and_loads_back(tmp_path, adapter, how):
    good, lora_model = adapter
    if how == "apply_lora_rnn":
        torch.manual_seed(0)
        model = LSTMLanguageModel(LSTMConfig(vocab_size=64, n_embd=8, hidden_size=8, num_layers=1))
        apply_lora_rnn(model.rnn, r=2, alpha=4)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("lora_B"):
                    p.normal_()
    elif how == "load_lora":
        model = tiny_gpt()
        load_lora(model, good)
    else:
        model = lora_model
        if how == "merged":
            merge_lora(model)
    idx = torch.randint(0, 64, (2, 8))
    model.eval()
    with torch.no_grad():
        want = model(idx)[0]
    model.save(tmp_path / "m.safetensors")
    back = load_model(tmp_path / "m.safetensors").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(idx)[0], want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model(idx)[0], want)  # the model keeps its LoRA layers
    assert not any(isinstance(m, LoRALinear) for m in back.modules())


# --------------------------------------------------------------------------- ICL data and templates


@pytest.mark.parametrize(
    "body,line,cells",
    [
        ("a,x\nb\n", 3, 1),  # too few cells
        ("a,x\nb,y,extra\n", 3, 3),  # too many
        ("a,x\n\n\nb,y,z\n", 5, 3),  # after blank lines
        ('"multi\nline",x\nb\n', 4, 1),  # after a quoted cell spanning two lines
        ("a,x,y\n", 2, 3),
        ("a\n", 2, 1),
    ],
)
def test_csv_rows_with_the_wrong_cell_count_name_file_and_line(tmp_path, body, line, cells):
    p = tmp_path / "data.csv"
    p.write_text("input,label\n" + body, encoding="utf-8")
    with pytest.raises(ValueError, match=f"{p}:{line}: the row has {cells} cells but the header has 2"):
        load_examples(p)


def test_good_csv_rows_still_load(tmp_path):
    p = tmp_path / "data.csv"
    p.write_text('input,label,extra\n"a, with comma",x,1\n\n"multi\nline",y,2\n', encoding="utf-8")
    ex = load_examples(p)
    assert [(e.input, e.output, dict(e.fields)) for e in ex] == [
        ("a, with comma", "x", {"extra": "1"}),
        ("multi\nline", "y", {"extra": "2"}),
    ]


@pytest.mark.parametrize("suffix", [".jsonl", ".csv", ".tsv-pairs", ".jsonl-pairs"])
def test_invalid_utf8_in_a_data_file_names_file_and_line(tmp_path, suffix):
    from ferrolm.recipes.translation import load_pairs

    if suffix == ".jsonl":
        p, body, load = tmp_path / "d.jsonl", b'{"input": "a", "label": "x"}\n{"input": "\xc3(", "label": "y"}\n', None
    elif suffix == ".csv":
        p, body, load = tmp_path / "d.csv", b"input,label\na,x\n\xe2\x82,y\n", None
    elif suffix == ".tsv-pairs":
        p, body, load = tmp_path / "p.tsv", b"one\tun\ntwo\tdeux\nthree\ttr\xffis\n", load_pairs
    else:
        p, body, load = tmp_path / "p.jsonl", b'{"source": "\x80", "target": "x"}\n', load_pairs
    p.write_bytes(body)
    line = body[: body.index(next(b for b in (b"\xc3(", b"\xe2\x82", b"\xff", b"\x80") if b in body))].count(b"\n") + 1
    with pytest.raises(FormatError, match=f"{p}:{line}: invalid UTF-8"):
        (load or load_examples)(p)
    with pytest.raises(FormatError, match=f"{p}:{line}"):
        read_text(p)


BAD_FIELDS = ["{input.__class__}", "{input[0]}", "{}", "{0}", "{input.__init__.__globals__}", "{input:{label.x}}"]


@pytest.mark.parametrize("field", BAD_FIELDS)
@pytest.mark.parametrize("which", ["demo", "query"])
def test_template_fields_are_plain_names(field, which):
    with pytest.raises(ValueError, match=f"Template.{which}"):
        Template(**{which: "Q: " + field})


@pytest.mark.parametrize("text", ["{input}", "{input!r}", "{input:>8}", "{{literal}} {input}", "{label}{extra_1}"])
def test_plain_template_fields_still_render(text):
    t = Template(demo=text, query=text)
    assert t.render_query(Example("x", "y", {"extra_1": "z"})) == text.format(input="x", label="y", extra_1="z")
