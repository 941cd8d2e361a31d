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
    lines = [x for x in err.splitlines() if x.strip() and "%|" not in x]  # progress bars aside
    errors = [x for x in lines if "error" in x.lower()]
    assert len(errors) == 1 and errors[0].startswith("ferrolm: error: ") and lines[-1] == errors[0], err
    for name in names:
        assert name in errors[0], (name, err)


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
    assert result.step == 2 and not (tmp_path / LOCK_FILE).exists()  # removed on release
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


# --------------------------------------------------------------------------- CLI arguments

#: (argv, the argument the one-line error must name): refused by the parser, before any work.
DO_NOTHING_OR_BAD_ARGS = [
    (["icl", "eval", "--model", "m", "--seeds", "0"], "--seeds"),
    (["icl", "eval", "--model", "m", "--seeds", "-2"], "--seeds"),
    (["icl", "eval", "--model", "m", "--k", "1,-1"], "--k"),
    (["icl", "eval", "--model", "m", "--k", "one"], "--k"),
    (["icl", "eval", "--model", "m", "--test-fraction", "0"], "--test-fraction"),
    (["icl", "eval", "--model", "m", "--test-fraction", "1"], "--test-fraction"),
    (["icl", "eval", "--model", "m", "--batch-size", "0"], "--batch-size"),
    (["generate", "--model", "m", "--num-samples", "0"], "--num-samples"),
    (["generate", "--model", "m", "--num-samples", "-1"], "--num-samples"),
    (["generate", "--model", "m", "--temperature", "nan"], "--temperature"),
    (["generate", "--model", "m", "--temperature", "inf"], "--temperature"),
    (["generate", "--model", "m", "--temperature", "-1"], "--temperature"),
    (["generate", "--model", "m", "--top-p", "0"], "--top-p"),
    (["generate", "--model", "m", "--top-p", "1.5"], "--top-p"),
    (["generate", "--model", "m", "--top-k", "0"], "--top-k"),
    (["generate", "--model", "m", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "--model", "m", "--max-new-tokens", "many"], "--max-new-tokens"),
    (["chat", "--model", "m", "--temperature", "nan"], "--temperature"),
    (["chat", "--model", "m", "--max-new-tokens", "-1"], "--max-new-tokens"),
    (["tokenizer", "train", "--vocab-size", "-1"], "--vocab-size"),
    (["tokenizer", "train", "--num-threads", "-1"], "--num-threads"),
    (["tokenizer", "train", "--num-threads", "0"], "--num-threads"),
    (["tokenizer", "train", "--max-bytes", "-5"], "--max-bytes"),
    (["tokenizer", "train", "--max-bytes", "0"], "--max-bytes"),
    (["tokenizer", "train", "--min-frequency", "-1"], "--min-frequency"),
    (["translate", "--model", "m", "--beam", "0"], "--beam"),
    (["translate", "--model", "m", "--max-new-tokens", "-3"], "--max-new-tokens"),
    (["finetune", "--model", "m", "--method", "lora", "--r", "0"], "--r"),
    (["finetune", "--model", "m", "--method", "lora", "--steps", "0"], "--steps"),
    (["finetune", "--model", "m", "--method", "lora", "--lora-dropout", "1"], "--lora-dropout"),
    (["finetune", "--model", "m", "--method", "lora", "--lr", "-1"], "--lr"),
    (["finetune", "--model", "m", "--method", "lora", "--alpha", "0"], "--alpha"),
    (["finetune", "--model", "m", "--method", "prompt", "--virtual-tokens", "0"], "--virtual-tokens"),
    (["finetune", "--model", "m", "--method", "nope"], "--method"),
    (["train", "seq2seq", "--beam", "0"], "--beam"),
    (["train", "seq2seq", "--ff-size", "-8"], "--ff-size"),
    (["bench", "--repeats", "0"], "--repeats"),
    (["icl"], "icl_command"),
    (["nonsense"], "nonsense"),
]


@pytest.mark.parametrize("argv,name", DO_NOTHING_OR_BAD_ARGS, ids=[" ".join(a) for a, _ in DO_NOTHING_OR_BAD_ARGS])
def test_bad_arguments_are_one_error_line_naming_them(capsys, argv, name):
    code, out, err = run_cli(argv, capsys)
    assert_one_error_line(code, err, name)
    assert out == ""


# --------------------------------------------------------------------------- CLI errors with models


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny GPT folder, the same with NaN weights, a tiny seq2seq folder and an ICL data file."""
    from ferrolm.recipes.translation import build_model, train_tokenizer

    root = tmp_path_factory.mktemp("models")
    tok = Tokenizer.train([TEXT], vocab_size=300, special_tokens=["<|endoftext|>"])
    gpt = tiny_gpt(tok.n_vocab)
    for name in ("gpt", "nan"):
        (root / name).mkdir()
        tok.save_hf_json(root / name / "tokenizer.json")
    gpt.save(root / "gpt" / "model.safetensors")
    with torch.no_grad():
        gpt.transformer.h[0].attn.c_attn.weight.fill_(float("nan"))
    gpt.save(root / "nan" / "model.safetensors")
    pairs = [("one", "un"), ("two", "deux"), ("three", "trois"), ("four", "quatre")] * 5
    s2s_tok = train_tokenizer(pairs, vocab_size=280)
    torch.manual_seed(0)
    s2s = build_model("transformer", s2s_tok, max_len=16, n_layer=1, n_head=2, n_embd=16, ff_size=32)
    (root / "s2s").mkdir()
    s2s.save(root / "s2s" / "model.safetensors")
    s2s_tok.save_hf_json(root / "s2s" / "tokenizer.json")
    rows = [{"input": f"item {i}", "label": "ab"[i % 2]} for i in range(12)]
    (root / "task.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "short.csv").write_text("input,label\nitem 1,a\nitem 2\nitem 3,b\n")
    (root / "latin1.jsonl").write_bytes(b'{"input": "caf\xe9", "label": "a"}\n')
    return root


def test_generate_on_a_seq2seq_folder_points_to_translate(capsys, folders):
    code, _, err = run_cli(["generate", folders / "s2s", "--prompt", "one"], capsys)
    assert_one_error_line(code, err, "translate", "Seq2SeqTransformer")


@pytest.mark.parametrize("temperature", ["0", "0.8"])
def test_generate_from_nan_weights_is_one_error_line(capsys, folders, temperature):
    code, _, err = run_cli(
        ["generate", folders / "nan", "--prompt", "the cat", "--max-new-tokens", "3", "--temperature", temperature],
        capsys,
    )
    assert_one_error_line(code, err, "NaN")


@pytest.mark.parametrize(
    "extra,name",
    [
        (["--demo", "{input[99]}"], "{input[99]}"),
        (["--demo", "{}"], "{}"),
        (["--query", "{input.__class__}"], "{input.__class__}"),
        (["--demo", "{input"], "Template.demo"),
        (["--demo", "{missing}"], "missing"),
        (["--label-words", "[1, 2"], "--label-words"),
        (["--label-words", "[1, 2]"], "--label-words"),
        (["--label-words", '{"a": 1}'], "--label-words"),
        (["--data", "short.csv"], "short.csv:3"),
        (["--data", "latin1.jsonl"], "latin1.jsonl:1"),
        (["--data", "absent.jsonl"], "absent.jsonl"),
        (["--label-words", '{"zz": " z"}'], "no label word"),
        (["--input-key", "nope"], "'nope'"),
    ],
)
def test_icl_eval_errors_are_one_line(tmp_path, capsys, folders, extra, name):
    extra = [str(folders / e) if e.endswith((".csv", ".jsonl")) else e for e in extra]
    argv = ["icl", "eval", "--model", folders / "gpt", "--data", folders / "task.jsonl", "--k", "0,1", "--seeds", "1"]
    code, _, err = run_cli([*argv, "--out", tmp_path / "res", *extra], capsys)
    assert_one_error_line(code, err, name)
    assert not (tmp_path / "res").exists()


def test_icl_eval_on_a_seq2seq_model_is_one_error_line(tmp_path, capsys, folders):
    argv = ["icl", "eval", "--model", folders / "s2s", "--data", folders / "task.jsonl", "--out", tmp_path / "res"]
    code, _, err = run_cli(argv, capsys)
    assert_one_error_line(code, err, "encoder-decoder", "translate")


def test_translate_keeps_blank_lines(capsys, folders, monkeypatch):
    import io

    from ferrolm.recipes.translation import translate_texts

    monkeypatch.setattr(sys, "stdin", io.StringIO("one\n\ntwo\n   \nthree\n"))
    code, out, err = run_cli(["translate", "--model", folders / "s2s", "--max-new-tokens", "4"], capsys)
    assert code == 0, err
    lines = out.split("\n")[:-1]
    model = load_model(folders / "s2s" / "model.safetensors")
    want = translate_texts(
        model, Tokenizer.from_file(folders / "s2s" / "tokenizer.json"), ["one", "two", "three"], max_new_tokens=4
    )
    assert lines == [want[0], "", want[1], "", want[2]]


# --------------------------------------------------------------------------- checkpoints' metadata


def _checkpoint_with(path: Path, config: str, **meta) -> Path:
    tensors = {k: v.contiguous() for k, v in tiny_gpt().state_dict().items() if k != "lm_head.weight"}
    save_file(
        tensors, str(path), metadata={"format": "ferrolm-model-1", "architecture": "gpt", "config": config, **meta}
    )
    return path


GOOD_CONFIG = tiny_gpt().config.to_dict()
BAD_CONFIGS = [
    ("not json", "{n_layer: 1"),
    ("a list", "[1, 2]"),
    ("a number", "1"),
    ("null", "null"),
    ("a string", '"gpt"'),
    ("a wrong type", json.dumps({**GOOD_CONFIG, "n_layer": "one"})),
    ("a negative size", json.dumps({**GOOD_CONFIG, "n_embd": -16})),
    ("an unknown key", json.dumps({**GOOD_CONFIG, "n_wings": 2})),
    ("more layers than tensors", json.dumps({**GOOD_CONFIG, "n_layer": 60})),
    ("a wider model than its tensors", json.dumps({**GOOD_CONFIG, "n_embd": 1024, "n_head": 16})),
    ("a larger vocabulary", json.dumps({**GOOD_CONFIG, "vocab_size": 50_000})),
    ("a longer block", json.dumps({**GOOD_CONFIG, "block_size": 4096})),
]


@pytest.mark.parametrize("case,config", BAD_CONFIGS, ids=[c for c, _ in BAD_CONFIGS])
def test_a_bad_config_in_checkpoint_metadata_is_a_format_error(tmp_path, case, config):
    p = _checkpoint_with(tmp_path / "m.safetensors", config)
    with pytest.raises(FormatError, match=str(p)):
        load_model(p)


def test_bad_aliases_metadata_is_a_format_error(tmp_path):
    p = _checkpoint_with(tmp_path / "m.safetensors", json.dumps(GOOD_CONFIG), aliases="[")
    with pytest.raises(FormatError, match="not valid JSON"):
        load_model(p)
    assert isinstance(load_model(_checkpoint_with(tmp_path / "ok.safetensors", json.dumps(GOOD_CONFIG))), GPT)


def test_a_config_claiming_gigabytes_is_refused_before_allocating(tmp_path):
    """350 KB of tensors whose config claims n_layer=60, n_embd=1024 (3.4 GB): refused from the
    meta-device build, the process never grows by more than a small fraction of that."""
    big = {**GOOD_CONFIG, "n_layer": 60, "n_embd": 1024, "n_head": 16, "vocab_size": 50_000, "block_size": 1024}
    p = _checkpoint_with(tmp_path / "big.safetensors", json.dumps(big))
    code = textwrap.dedent(
        f"""
        import resource, sys
        from ferrolm import FormatError
        from ferrolm.models import load_model
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            load_model({str(p)!r})
        except FormatError as e:
            print("FormatError", str(e)[:200])
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0].startswith("FormatError") and "does not match the tensors" in lines[0]
    assert int(lines[-1]) < 300, f"grew by {lines[-1]} MB"


# --------------------------------------------------------------------------- kernels, modules, shards

#: Each case is an expression over torch, np, attention, decode_attention; run in a fresh
#: interpreter (a Rust panic in a kernel would end it), printing one JSON line per case.
KERNEL_RUNNER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch
    from ferrolm.kernels.attention import attention
    from ferrolm.kernels.decode import decode_attention
    z = torch.zeros
    for i, expr in enumerate(json.loads(sys.argv[1])):
        try:
            out = eval(expr)
            print(json.dumps({"case": i, "type": None, "msg": str(tuple(out.shape))}), flush=True)
        except Exception as e:
            print(json.dumps({"case": i, "type": type(e).__name__, "msg": str(e)}), flush=True)
    """
)

#: (expression, exception type or None, text of the message or of the output shape)
KERNEL_CASES = [
    ("attention(z(1, 1, 2, 0), z(1, 1, 2, 0), z(1, 1, 2, 0))", "ValueError", "head_dim"),
    ("attention(z(1, 1, 2, 0), z(1, 1, 2, 0), z(1, 1, 2, 4), scale=1.0)", "ValueError", "head_dim"),
    ("attention(z(1, 1, 2, 4), z(1, 1, 2, 4), z(1, 1, 2, 0))", "ValueError", "head_dim"),
    (
        "attention(z(2, 2, 3, 0, dtype=torch.float64), z(2, 2, 3, 0, dtype=torch.float64), "
        "z(2, 2, 3, 0, dtype=torch.float64), causal=True)",
        "ValueError",
        "head_dim",
    ),
    (
        "attention(z(1, 1, 2, 0, dtype=torch.bfloat16), z(1, 1, 2, 0, dtype=torch.bfloat16), "
        "z(1, 1, 2, 0, dtype=torch.bfloat16))",
        "ValueError",
        "head_dim",
    ),
    ("decode_attention(z(1, 1, 0), z(1, 1, 3, 0), z(1, 1, 3, 0), [2])", "ValueError", "head_dim"),
    ("decode_attention(z(1, 1, 4), z(1, 1, 3, 4), z(1, 1, 3, 0), [2])", "ValueError", "head_dim"),
    ("decode_attention(z(0, 2, 4), z(0, 2, 3, 4), z(0, 2, 3, 4), [])", None, "(0, 2, 4)"),
    ("decode_attention(z(0, 2, 1, 4), z(0, 2, 3, 4), z(0, 2, 3, 4), [])", None, "(0, 2, 1, 4)"),
    ("decode_attention(z(2, 1, 4), z(2, 1, 6, 4), z(2, 1, 6, 4), [2.7, 5])", "TypeError", "2.7"),
    ("decode_attention(z(2, 1, 4), z(2, 1, 6, 4), z(2, 1, 6, 4), [2.0, 5])", "TypeError", "2.0"),
    ("decode_attention(z(2, 1, 4), z(2, 1, 6, 4), z(2, 1, 6, 4), np.array([2.5, 1.0]))", "TypeError", "float64"),
    ("decode_attention(z(2, 1, 4), z(2, 1, 6, 4), z(2, 1, 6, 4), torch.tensor([2.0, 1.0]))", "TypeError", "float32"),
    ("decode_attention(z(2, 1, 4), z(2, 1, 6, 4), z(2, 1, 6, 4), torch.tensor([True, False]))", "TypeError", "bool"),
    ("decode_attention(z(2, 1, 4), z(2, 1, 6, 4), z(2, 1, 6, 4), [True, 1])", "TypeError", "True"),
    ("decode_attention(z(2, 1, 4), z(2, 1, 6, 4), z(2, 1, 6, 4), [None, 1])", "TypeError", "None"),
    ("decode_attention(z(2, 1, 4), z(2, 1, 6, 4), z(2, 1, 6, 4), '25')", "TypeError", "'2'"),
    ("decode_attention(z(2, 1, 4), z(2, 1, 6, 4), z(2, 1, 6, 4), 5)", "TypeError", "int"),
    ("decode_attention(z(2, 1, 4), z(2, 1, 6, 4), z(2, 1, 6, 4), [2, 7])", "ValueError", "cache_lengths"),
    ("decode_attention(z(2, 1, 4), z(2, 1, 6, 4), z(2, 1, 6, 4), [2, -1])", "ValueError", "cache_lengths"),
    ("decode_attention(z(2, 1, 4), z(2, 1, 6, 4), z(2, 1, 6, 4), [2, 5])", None, "(2, 1, 4)"),
    ("decode_attention(z(2, 1, 4), z(2, 1, 6, 4), z(2, 1, 6, 4), np.array([2, 5], dtype=np.uint8))", None, "(2, 1, 4)"),
    ("decode_attention(z(2, 1, 4), z(2, 1, 6, 4), z(2, 1, 6, 4), torch.tensor([2, 5]))", None, "(2, 1, 4)"),
]


def test_kernel_shapes_and_lengths_give_clear_errors():
    exprs = [e for e, _, _ in KERNEL_CASES]
    proc = subprocess.run(
        [sys.executable, "-c", KERNEL_RUNNER, json.dumps(exprs)], capture_output=True, text=True, timeout=300
    )
    done = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    assert proc.returncode == 0 and len(done) == len(exprs), (len(done), proc.stderr[-2000:])
    assert "panicked" not in proc.stderr, proc.stderr[-2000:]
    for (expr, exc, text), got in zip(KERNEL_CASES, done):
        assert got["type"] == exc and text in got["msg"], (expr, got)


@pytest.mark.parametrize("cell", ["LSTM", "GRU"])
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bidirectional", [False, True])
@pytest.mark.parametrize("with_state", [False, True])
def test_an_empty_batch_gives_empty_outputs_as_torch_does(cell, batch_first, bidirectional, with_state):
    import ferrolm.nn as fnn

    kw = dict(input_size=4, hidden_size=8, num_layers=2, batch_first=batch_first, bidirectional=bidirectional)
    ours, ref = getattr(fnn, cell)(**kw), getattr(torch.nn, cell)(**kw)
    x = torch.zeros((0, 3, 4) if batch_first else (3, 0, 4), requires_grad=True)
    h = torch.zeros(2 * (2 if bidirectional else 1), 0, 8)
    state = None if not with_state else ((h, h) if cell == "LSTM" else h)
    got, want = ours(x, state), ref(x, state)
    flat = lambda o: [o[0]] + (list(o[1]) if isinstance(o[1], tuple) else [o[1]])  # noqa: E731
    assert [t.shape for t in flat(got)] == [t.shape for t in flat(want)]


def test_token_shard_on_a_folder_says_so(tmp_path):
    from ferrolm.data import TokenShard

    with pytest.raises(IsADirectoryError, match=f"{tmp_path} is a folder, not a token shard"):
        TokenShard(tmp_path)


@pytest.mark.parametrize(
    "extra,names",
    [
        (["--n-head", "3", "--n-embd", "32"], "n_head"),
        (["--resume"], "train_state.pt"),
        (["--steps", "0"], "--steps"),
        (["--vocab-size", "5"], "vocab_size"),
        (["--model", "gru"], "--model"),
        (["--tokenizer", "MISSING/tok.json"], "tok.json"),
    ],
)
def test_a_rejected_seq2seq_train_leaves_out_as_it_was(tmp_path, capsys, extra, names):
    pairs = tmp_path / "pairs.tsv"
    pairs.write_text("".join(f"{a}\t{b}\n" for a, b in [("one", "un"), ("two", "deux"), ("three", "trois")] * 30))
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    extra = [str(tmp_path / a) if a.startswith("MISSING") else a for a in extra]
    argv = ["train", "seq2seq", pairs, "--out", out, "--n-layer", "1", "--n-embd", "16", "--ff-size", "32"]
    code, _, err = run_cli([*argv, "--batch-size", "4", "--steps", "2", *extra], capsys)
    assert_one_error_line(code, err, names)
    assert snapshot(out) == {"notes.txt": b"mine"}


def test_shards_with_ids_beyond_the_tokenizer_are_refused(tmp_path, capsys, folders):
    import struct

    shard = tmp_path / "data.bin"
    ids = list(range(1, 1000))
    shard.write_bytes(b"FLMTOKS\0" + struct.pack("<IIQ8x", 1, 2, len(ids)) + struct.pack(f"<{len(ids)}H", *ids))
    out = tmp_path / "out"
    argv = ["train", "gpt", shard, "--tokenizer", folders / "gpt" / "tokenizer.json", "--out", out, *SMALL]
    code, _, err = run_cli(argv, capsys)
    assert_one_error_line(code, err, "token id 999", "--tokenizer")
    assert not out.exists()


def test_resuming_another_architecture_is_refused(tmp_path, capsys, folders, corpus):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(folders / "gpt", out)
    before = snapshot(out)
    code, _, err = run_cli(["train", "lstm", corpus, "--out", out, *SMALL, "--resume"], capsys)
    assert_one_error_line(code, err, "GPT", "LSTMLanguageModel")
    assert snapshot(out) == before


@pytest.mark.parametrize("arch", ["gpt", "seq2seq"])
def test_out_being_a_file_is_refused_and_the_file_kept(tmp_path, capsys, corpus, arch):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    data = [] if arch == "seq2seq" else [corpus]
    code, _, err = run_cli(["train", arch, *data, "--out", out, *SMALL[:2], "--steps", "1"], capsys)
    assert code == 2 and "Traceback" not in err and str(out) in err, err
    assert out.read_text() == "mine"


# --------------------------------------------------------------------------- tokenizer counts and ids

_TOK_CALLS = {
    "train vocab_size": lambda t, v: __import__("ferrolm").Tokenizer.train(["ab ab"], vocab_size=v),
    "train num_threads": lambda t, v: __import__("ferrolm").Tokenizer.train(["ab ab"], vocab_size=300, num_threads=v),
    "encode_batch num_threads": lambda t, v: t.encode_batch(["a b"], num_threads=v),
    "encode_ordinary_batch num_threads": lambda t, v: t.encode_ordinary_batch(["a b"], num_threads=v),
    "encode_batch_to_numpy num_threads": lambda t, v: t.encode_batch_to_numpy(["a b"], num_threads=v),
    "decode_batch num_threads": lambda t, v: t.decode_batch([[1, 2]], num_threads=v),
    "decode_bytes_batch num_threads": lambda t, v: t.decode_bytes_batch([[1, 2]], num_threads=v),
}


@pytest.mark.parametrize("value", [-1, -(2**40), -(2**63)])
@pytest.mark.parametrize("call", sorted(_TOK_CALLS))
def test_negative_tokenizer_counts_name_the_argument(call, value):
    from ferrolm import Tokenizer

    tok = Tokenizer.from_tiktoken(Path(__file__).parent / "data" / "gpt2.tiktoken")
    name = call.split()[-1]
    with pytest.raises(ValueError, match=f"{name} must be"):
        _TOK_CALLS[call](tok, value)


@pytest.mark.parametrize("bad", [-1, -(2**62), 50257, 2**40])
def test_decoding_an_id_out_of_range_names_it(bad):
    from ferrolm import Tokenizer, UnknownTokenError

    tok = Tokenizer.from_tiktoken(Path(__file__).parent / "data" / "gpt2.tiktoken")
    for fn in (tok.decode, tok.decode_bytes, lambda ids: tok.decode_batch([ids])):
        with pytest.raises(UnknownTokenError, match=f"token id {bad} is not in the vocabulary"):
            fn([1, bad])


def test_any_int_as_a_tokenizer_count_gives_a_result_or_a_clear_error():
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    from ferrolm import Tokenizer

    tok = Tokenizer.from_tiktoken(Path(__file__).parent / "data" / "gpt2.tiktoken")
    want = tok.encode_batch(["a b", "c"])

    @hypothesis.settings(max_examples=60, deadline=None)
    @hypothesis.given(st.integers(min_value=-(2**70), max_value=2**70))
    def check(n):
        try:
            got = tok.encode_batch(["a b", "c"], num_threads=n)
        except (ValueError, OverflowError) as e:
            assert "num_threads" in str(e)
        else:
            assert got == want

    check()
