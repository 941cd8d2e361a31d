"""The training loop: schedule against its formula, the batch order, loss going down on the
embedded corpus, exact resume, Ctrl-C, checkpoints and DDP with two processes."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ferrolm import FormatError, Tokenizer  # noqa: E402
from ferrolm.corpus import default_corpus  # noqa: E402
from ferrolm.models import GPT, GPTConfig, LSTMConfig, LSTMLanguageModel, load_model  # noqa: E402
from ferrolm.training import (
    ExampleBatches,
    SyntheticBatches,
    TokenBatches,
    TrainConfig,
    evaluate,
    load_train_state,
    lr_at,
    train,
)  # noqa: E402


def test_lr_schedule_is_warmup_then_cosine():
    cfg = TrainConfig(max_steps=110, warmup_steps=10, lr=1e-3, min_lr=1e-4)
    for s in range(10):
        assert lr_at(s, cfg) == pytest.approx(1e-3 * (s + 1) / 10)
    for s in range(10, 111):
        want = 1e-4 + 0.5 * (1 + math.cos(math.pi * (s - 10) / 100)) * 9e-4
        assert lr_at(s, cfg) == pytest.approx(want, rel=1e-12)
    assert lr_at(110, cfg) == pytest.approx(1e-4)


def test_token_batches_cover_each_epoch_and_split_between_ranks():
    tokens = np.arange(1001)
    one = TokenBatches(tokens, batch_size=4, seq_len=10, seed=3)
    assert one.n_windows == 100 and one.per_epoch == 25
    starts = []
    for _ in range(25):
        x, y = one.next()
        assert torch.equal(y, x + 1)  # targets are the next tokens
        assert bool((x[:, 1:] - x[:, :-1] == 1).all())
        starts += (x[:, 0] // 10).tolist()
        assert all(int(r[0]) % 10 == 0 for r in x)
    assert sorted(starts) == list(range(100))
    x_next_epoch, _ = one.next()
    assert one.epoch == 1
    # Two ranks of batch 2 see exactly the rows of one process with batch 4.
    r0 = TokenBatches(tokens, 2, 10, seed=3, rank=0, world_size=2)
    r1 = TokenBatches(tokens, 2, 10, seed=3, rank=1, world_size=2)
    full = TokenBatches(tokens, 4, 10, seed=3)
    for _ in range(30):
        assert torch.equal(torch.cat([r0.next()[0], r1.next()[0]]), full.next()[0])
    with pytest.raises(ValueError, match="too few"):
        TokenBatches(np.arange(30), 4, 10)


@pytest.fixture(scope="module")
def corpus_tokens():
    docs = default_corpus(max_bytes=400_000)
    tok = Tokenizer.train(docs, vocab_size=512)
    ids = np.concatenate([np.asarray(tok.encode_ordinary(d), dtype=np.int64) for d in docs])
    cut = int(len(ids) * 0.9)
    return ids[:cut], ids[cut:]


def _pairs(seed, n=10, vocab=50):
    g = np.random.default_rng(seed)
    return [
        (g.integers(0, vocab, int(g.integers(1, 12))).tolist(), g.integers(0, vocab, int(g.integers(1, 4))).tolist())
        for _ in range(n)
    ]


@pytest.mark.parametrize("kind", ["gpt", "lstm"])
def test_example_batches_score_only_the_targets_and_padding_does_not_leak(kind):
    torch.manual_seed(0)
    model = (
        GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16))
        if kind == "gpt"
        else LSTMLanguageModel(LSTMConfig(vocab_size=50, n_embd=12, hidden_size=16, num_layers=2))
    ).eval()
    pairs = _pairs(1)
    b = ExampleBatches(pairs, batch_size=5, seq_len=15, seed=2)
    assert b.per_epoch == 2
    seen = []
    for _ in range(2):
        x, y = b.next()
        with torch.no_grad():
            _, loss = model(x, targets=y)
        # Independent: each example alone, unpadded, its target tokens' log-probs.
        rows = [pairs[i] for i in b._picked(0, len(seen) // 5)]
        seen += rows
        logps = []
        for prompt, target in rows:
            seq = torch.tensor([prompt + target])
            with torch.no_grad():
                lp = torch.log_softmax(model(seq[:, :-1])[0].double(), -1)[0]
            logps += [float(lp[len(prompt) - 1 + j, t]) for j, t in enumerate(target)]
        assert float(loss) == pytest.approx(-sum(logps) / len(logps), rel=1e-5)
    assert sorted(map(str, seen)) == sorted(map(str, pairs))  # one epoch = every example once


def test_example_batches_cut_long_prompts_from_the_left_and_reject_bad_pairs():
    b = ExampleBatches([(list(range(1, 11)), [20, 21])], batch_size=1, seq_len=6, shuffle=False)
    x, y = b.next()
    assert x.tolist() == [[6, 7, 8, 9, 10, 20]] and y.tolist() == [[-100, -100, -100, -100, 20, 21]]
    with pytest.raises(ValueError, match="example 0: the target is empty"):
        ExampleBatches([([1], [])], batch_size=1, seq_len=4)
    with pytest.raises(ValueError, match="example 0: a target of 5 tokens does not fit seq_len=4"):
        ExampleBatches([([1], [1, 2, 3, 4, 5])], batch_size=1, seq_len=4)
    with pytest.raises(ValueError, match="example 1: the prompt is empty"):
        ExampleBatches([([1], [2]), ([], [2])], batch_size=1, seq_len=4)
    with pytest.raises(ValueError, match="too few for one batch of 4"):
        ExampleBatches(_pairs(0, n=3), batch_size=4, seq_len=16)
    with pytest.raises(ValueError, match="1-D sequence of int"):
        ExampleBatches([([[1, 2]], [3])], batch_size=1, seq_len=4)


def test_train_takes_prompt_target_pairs_and_learns_the_targets():
    """Supervised fine-tuning through the same trainer: the first step's loss is the
    initial model's target-only loss on the first batch, and training fits the targets."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=32))
    g = np.random.default_rng(3)
    pairs = [
        (g.integers(0, 50, 6).tolist(), [7 + (i % 3)]) for i in range(24)
    ]  # target = a function of nothing but i % 3
    pairs = [(p[:-1] + [40 + t[0]], t) for p, t in pairs]  # ... shown by the prompt's last token
    cfg = TrainConfig(max_steps=120, batch_size=8, seq_len=15, lr=1e-2, warmup_steps=5, eval_interval=0, progress=False)
    with torch.no_grad():
        x, y = ExampleBatches(pairs, 8, 15, cfg.seed).batch_at(0, 0)
        want = float(model.eval()(x, targets=y)[1])
    res = train(model, pairs, config=cfg)
    assert res.history[0]["loss"] == pytest.approx(want, rel=1e-5)
    assert res.history[0]["loss"] > 3.0 and res.history[-1]["loss"] < 0.1


def test_fused_adam_follows_the_same_curve():
    """TrainConfig.fused_adam: AdamW's fused kernel takes the same steps up to rounding (the
    losses agree to 1e-5 relative; the weights after 20 steps to 1e-3, a tenth of one step of
    lr=1e-2: Adam divides by sqrt(v), which magnifies rounding where gradients are tiny)."""
    g = np.random.default_rng(1)
    pairs = [(g.integers(0, 50, 6).tolist(), [int(g.integers(0, 50))]) for _ in range(16)]
    runs = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_embd=32))
        cfg = TrainConfig(
            max_steps=20,
            batch_size=8,
            seq_len=15,
            lr=1e-2,
            warmup_steps=2,
            eval_interval=0,
            fused_adam=fused,
            progress=False,
        )
        res = train(model, pairs, config=cfg)
        runs.append(([h["loss"] for h in res.history], model.state_dict()))
    (plain, w0), (fused, w1) = runs
    assert plain[-1] < plain[0] - 1.0
    assert fused == pytest.approx(plain, rel=1e-5)
    for k in w0:
        torch.testing.assert_close(w1[k], w0[k], rtol=0, atol=1e-3)


@pytest.mark.parametrize("kind", ["gpt", "lstm"])
def test_short_training_lowers_loss_on_embedded_corpus(corpus_tokens, kind):
    train_ids, val_ids = corpus_tokens
    torch.manual_seed(0)
    if kind == "gpt":
        model = GPT(GPTConfig(vocab_size=512, block_size=64, n_layer=2, n_head=4, n_embd=64))
    else:
        model = LSTMLanguageModel(LSTMConfig(vocab_size=512, n_embd=64, hidden_size=64, num_layers=1, tie_weights=True))
    cfg = TrainConfig(
        max_steps=60,
        batch_size=8,
        seq_len=64,
        lr=3e-3,
        min_lr=3e-4,
        warmup_steps=5,
        eval_interval=30,
        eval_batches=5,
        progress=False,
    )
    before = evaluate(model, TokenBatches(val_ids, 8, 64, shuffle=False), 5)
    assert before == pytest.approx(math.log(512), rel=0.1)  # an untrained model is near uniform
    result = train(model, train_ids, val_ids, cfg)
    assert [e["step"] for e in result.evals] == [30, 60]
    after = result.evals[-1]["val_loss"]
    assert after < before - 0.7, (before, after)
    assert result.evals[-1]["val_ppl"] == pytest.approx(math.exp(after))
    assert len(result.history) == 60 and result.tokens == 60 * 8 * 64


def _resume_pair(make_model, tmp_path, tokens):
    cfg = TrainConfig(
        max_steps=12,
        batch_size=4,
        seq_len=32,
        lr=2e-3,
        warmup_steps=3,
        eval_interval=4,
        eval_batches=2,
        checkpoint_interval=5,
        grad_accum=2,
        progress=False,
    )
    torch.manual_seed(1)
    full = train(make_model(), tokens, tokens, cfg, out_dir=tmp_path / "a")

    def stop_at_7(step, metrics):
        if step == 7:
            raise KeyboardInterrupt

    torch.manual_seed(1)
    first = train(make_model(), tokens, tokens, cfg, out_dir=tmp_path / "b", callback=stop_at_7)
    assert first.interrupted and first.step == 7
    assert load_train_state(tmp_path / "b")["step"] == 7
    torch.manual_seed(999)  # the resumed run must not depend on the caller's RNG
    second = train(make_model(), tokens, tokens, cfg, out_dir=tmp_path / "b", resume=True)
    assert not second.interrupted and second.step == 12
    return full, second


def test_synthetic_batches_are_a_function_of_position_and_resume_exactly(tmp_path):
    from ferrolm.recipes.icl_science import VectorSequenceModel

    def make(rng):
        x = torch.from_numpy(rng.standard_normal((8, 6, 3)).astype(np.float32))
        return x, x.sum(-1)  # learn the sum of each vector

    src = SyntheticBatches(make, seed=4)
    first = [src.next()[0] for _ in range(3)]
    for i, x in enumerate(first):
        assert torch.equal(x, SyntheticBatches(make, seed=4).batch_at(0, i)[0])
    assert not torch.equal(first[0], SyntheticBatches(make, seed=5).batch_at(0, 0)[0])

    def model():
        torch.manual_seed(0)
        return VectorSequenceModel(GPT(GPTConfig(vocab_size=1, block_size=6, n_layer=1, n_head=2, n_embd=16)), 3, 1)

    cfg = TrainConfig(max_steps=8, lr=3e-3, warmup_steps=2, eval_interval=0, progress=False)
    full = train(model(), SyntheticBatches(make, seed=4), config=cfg)

    def stop_at_5(step, metrics):
        if step == 5:
            raise KeyboardInterrupt

    part = train(model(), SyntheticBatches(make, seed=4), config=cfg, out_dir=tmp_path, callback=stop_at_5)
    assert part.interrupted and part.step == 5
    rest = train(model(), SyntheticBatches(make, seed=4), config=cfg, out_dir=tmp_path, resume=True)
    np.testing.assert_allclose([h["loss"] for h in rest.history], [h["loss"] for h in full.history], rtol=1e-6)
    assert full.history[-1]["loss"] < full.history[0]["loss"]
    with pytest.raises(ValueError, match="another source"):
        train(model(), SyntheticBatches(make, seed=9), config=cfg, out_dir=tmp_path, resume=True)


@pytest.mark.parametrize("kind", ["gpt", "lstm"])
def test_resume_gives_the_same_loss_curve(corpus_tokens, tmp_path, kind):
    tokens = corpus_tokens[0][:40_000]
    if kind == "gpt":
        make = lambda: GPT(GPTConfig(vocab_size=512, block_size=32, n_layer=2, n_head=2, n_embd=32, dropout=0.1))  # noqa: E731
    else:
        make = lambda: LSTMLanguageModel(  # noqa: E731
            LSTMConfig(vocab_size=512, n_embd=32, hidden_size=32, num_layers=2, dropout=0.1)
        )
    full, resumed = _resume_pair(make, tmp_path, tokens)
    a = [h["loss"] for h in full.history]
    b = [h["loss"] for h in resumed.history]
    assert len(a) == len(b) == 12
    np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose([e["val_loss"] for e in resumed.evals], [e["val_loss"] for e in full.evals], rtol=1e-6)
    ma, mb = load_model(tmp_path / "a" / "model.safetensors"), load_model(tmp_path / "b" / "model.safetensors")
    for (k, va), vb in zip(ma.state_dict().items(), mb.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=1e-5, atol=1e-6, msg=k)


def test_ctrl_c_saves_a_checkpoint_and_returns(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 64, 20_000)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=1, n_head=2, n_embd=16))

    def press_ctrl_c(step, metrics):
        if step == 3:
            os.kill(os.getpid(), signal.SIGINT)

    result = train(
        model,
        tokens,
        config=TrainConfig(max_steps=50, batch_size=2, seq_len=16, progress=False),
        out_dir=tmp_path,
        callback=press_ctrl_c,
    )
    assert result.interrupted and result.step == 3
    state = load_train_state(tmp_path)
    assert state["step"] == 3 and state["data"]["index"] == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_train_state(tmp_path)
    (tmp_path / "train_state.pt").write_bytes(b"garbage")
    with pytest.raises(FormatError):
        load_train_state(tmp_path)
    with pytest.raises(ValueError, match="resume=True needs out_dir"):
        train(
            GPT(GPTConfig(vocab_size=8, block_size=8, n_layer=1, n_head=1, n_embd=4)), np.arange(100) % 8, resume=True
        )
    with pytest.raises(ValueError, match="exceeds the model's block_size"):
        train(
            GPT(GPTConfig(vocab_size=8, block_size=8, n_layer=1, n_head=1, n_embd=4)),
            np.arange(1000) % 8,
            config=TrainConfig(seq_len=16, batch_size=2, progress=False),
        )
    with pytest.raises(ValueError, match="unknown TrainConfig keys"):
        TrainConfig.from_dict({"steps": 3})


DDP_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, torch
    from ferrolm.models import GPT, GPTConfig, save_model
    from ferrolm.training import TrainConfig, train
    batch, out = int(sys.argv[1]), sys.argv[2]
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16))
    tokens = np.random.default_rng(0).integers(0, 64, 30_000)
    res = train(model, tokens, tokens, TrainConfig(max_steps=6, batch_size=batch, seq_len=16, warmup_steps=2,
                                                    eval_interval=3, eval_batches=2, progress=False))
    import torch.distributed as dist
    import os
    if int(os.environ.get("RANK", "0")) == 0:
        save_model(model, out)
        print("LOSSES", [round(h["loss"], 6) for h in res.history])
    """
)


def test_ddp_two_processes_equal_one_process_with_the_global_batch(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        "2",
        str(tmp_path / "ddp.safetensors"),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    single = subprocess.run(
        [sys.executable, str(script), "4", str(tmp_path / "one.safetensors")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert single.returncode == 0, single.stderr[-3000:]
    a, b = load_model(tmp_path / "ddp.safetensors"), load_model(tmp_path / "one.safetensors")
    moved = 0.0
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(va, vb, rtol=1e-4, atol=1e-5, msg=k)
    fresh = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16))
    torch.manual_seed(0)
    fresh = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=16))
    for va, vf in zip(a.state_dict().values(), fresh.state_dict().values()):
        moved = max(moved, float((va - vf).abs().max()))
    assert moved > 1e-3, "training did not change the weights"
    la = [line for line in done.stdout.splitlines() if line.startswith("LOSSES")]
    lb = [line for line in single.stdout.splitlines() if line.startswith("LOSSES")]
    assert la and lb
    np.testing.assert_allclose(eval(la[0][7:]), eval(lb[0][7:]), rtol=1e-4)
