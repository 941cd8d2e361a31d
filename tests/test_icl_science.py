"""The ICL science suite: task generators against independent constructions, the baselines
against closed forms, and tiny seeded runs of each experiment asserting its qualitative effect."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from ferrolm.models import GPT, GPTConfig  # noqa: E402
from ferrolm.recipes import icl_science as science  # noqa: E402


def test_regression_baselines_least_squares_is_exact_from_d_examples_and_follows_1_minus_k_over_d():
    d, n = 5, 11
    xs, ys = science.regression_prompts(np.random.default_rng(0), 4000, n, d)
    err = science.regression_baselines(xs, ys)
    assert all(err["least_squares"][k] < 1e-20 for k in range(d, n))  # noiseless: w is determined
    for k in range(d):  # minimum-norm LS recovers the projection of w on k random directions
        assert err["least_squares"][k] == pytest.approx(1 - k / d, abs=0.06)
    # Averaging, w_hat = mean(y_i x_i): unbiased with covariance (|w|^2 I + w w^T) / k, so its
    # error / d is E[(d + 1)|w|^2] / (k d) = (d + 1) / k; with no example, E[y^2] / d = 1.
    for k in range(1, n):
        assert err["averaging"][k] == pytest.approx((d + 1) / k, rel=0.15)
    assert err["averaging"][0] == pytest.approx(1.0, rel=0.15) and err["knn3"][n - 1] > 0.3
    z, t = science._regression_inputs(xs[:1], ys[:1])
    assert z.shape == (1, 2 * n, d) and torch.isnan(t[0, 1::2]).all()
    assert torch.allclose(z[0, 1::2, 0], torch.from_numpy(ys[0]).float()) and float(z[0, 1::2, 1:].abs().sum()) == 0


def test_mqar_batches_ask_for_the_value_stored_with_each_queried_key():
    x, y = science.mqar_batch(np.random.default_rng(1), 16, 64, 8)
    assert x.shape == y.shape == (16, 63)
    for b in range(16):
        row = x[b].tolist()
        table = {row[2 * i]: row[2 * i + 1] for i in range(8)}
        assert len(table) == 8 and all(1 <= k < 128 for k in table) and all(128 <= v < 256 for v in table.values())
        asked = [(t, int(y[b, t])) for t in range(63) if y[b, t] != -100]
        assert len(asked) == (64 - 16) // 2
        for t, want in asked:
            assert t >= 16 and table[row[t]] == want
            if t + 1 < 63:
                assert row[t + 1] == want  # teacher forcing: the value follows its key
    with pytest.raises(ValueError, match="even length"):
        science.mqar_batch(np.random.default_rng(0), 1, 10, 8)


def test_vector_model_reads_vectors_into_a_ferrolm_backbone_and_checks_shapes():
    torch.manual_seed(0)
    gpt = GPT(GPTConfig(vocab_size=1, block_size=8, n_layer=1, n_head=2, n_embd=16))
    m = science.VectorSequenceModel(gpt, 3, 1)
    x = torch.randn(2, 8, 3)
    t = torch.full((2, 8), float("nan"))
    t[:, ::2] = torch.randn(2, 4)
    out, loss = m(x, t)
    want = gpt.hidden_states(None, inputs_embeds=m.read_in(x))
    torch.testing.assert_close(out, m.read_out(want))
    torch.testing.assert_close(loss, ((out[:, ::2, 0] - t[:, ::2]) ** 2).mean())
    with pytest.raises(ValueError, match=r"x must be \(B, T, 3\)"):
        m(torch.randn(2, 8, 4))
    with pytest.raises(TypeError, match="ferrolm GPT or LSTMLanguageModel"):
        science.VectorSequenceModel(torch.nn.Linear(2, 2), 3, 1)


def test_recall_tiny_gpt_recalls_far_better_than_an_lstm_of_its_size():
    res = science.recall(quick=True, seed=0, progress=False)
    by = {(r["model"], r["length"], r["pairs"]): r for r in res["rows"]}
    gpt, lstm = by[("GPT", 64, 4)], by[("LSTM", 64, 4)]
    assert abs(gpt["parameters"] - lstm["parameters"]) < 0.1 * gpt["parameters"]
    assert gpt["accuracy"] > 0.8 and gpt["accuracy"] > lstm["accuracy"] + 0.4


def test_cli_experiment_writes_json_and_png(tmp_path):
    import subprocess
    import sys

    r = subprocess.run(
        [sys.executable, "-m", "ferrolm.cli", "icl", "experiment", "regression", "--quick", "--results", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| k | transformer | least squares | knn3 | averaging |" in r.stdout
    res = json.loads((tmp_path / "icl_regression.json").read_text())
    assert res["quick"] and res["wall_seconds"] > 0 and len(res["errors"]["transformer"]) == res["n_points"]
    assert (tmp_path / "icl_regression.png").read_bytes()[:4] == b"\x89PNG"
    bad = subprocess.run(
        [sys.executable, "-m", "ferrolm.cli", "icl", "experiment", "nope"], capture_output=True, text=True, timeout=600
    )
    assert bad.returncode == 2 and "unknown experiment 'nope'" in bad.stderr


def test_induction_rows_repeat_a_segment_of_varying_length_and_batches_score_only_the_repeat():
    seq, hs = science.induction_rows(np.random.default_rng(3), 32, 64)
    assert len(set(hs.tolist())) > 5 and hs.min() >= 8 and hs.max() <= 32
    for row, h in zip(seq, hs):
        assert (row[64 - h :] == row[64 - 2 * h : 64 - h]).all()
    x, y = science.induction_batch(np.random.default_rng(3), 32, 64)
    assert torch.equal(x, torch.from_numpy(seq[:, :-1]))
    for b, h in enumerate(hs):
        scored = (y[b] != -100).nonzero()[:, 0]
        assert scored.tolist() == list(range(63 - h, 63))
        assert torch.equal(y[b, scored], torch.from_numpy(seq[b, 64 - h :]))


def test_prefix_matching_score_equals_a_direct_loop_over_the_attention_pattern():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=50, block_size=32, n_layer=2, n_head=2, n_embd=16, mlp=False, positions="rotary"))
    seq, hs = science.induction_rows(np.random.default_rng(1), 4, 32, vocab=50)
    got = science.prefix_matching_scores(model, seq, hs)
    x = torch.from_numpy(seq[:, :-1].copy())
    h_in = model.transformer.drop(model.transformer.wte(x))
    for layer, blk in enumerate(model.transformer.h):
        w = blk.attn.attention_weights(blk.ln_1(h_in)).detach()
        for head in range(2):
            vals = [float(w[b, head, i, i - h + 1]) for b, h in enumerate(hs) for i in range(31 - h, 31)]
            assert got[layer][head] == pytest.approx(sum(vals) / len(vals), rel=1e-6)
        h_in = blk(h_in)


def test_induction_two_attention_layers_copy_the_repeat_and_one_layer_cannot():
    one = science.induction_toy(1, 600, seed=0)
    two = science.induction_toy(2, 600, seed=0)
    assert two["repeat_loss"] < 1.5 and one["repeat_loss"] > 3.5  # uniform guessing is ln 256 = 5.5
    assert two["best_prefix_matching"] > 0.5 and one["best_prefix_matching"] < 0.2


def test_fewshot_sequences_carry_the_answer_only_where_the_mode_says():
    task = science.FewShotTask(seed=0, d=8, n_classes=40, n_train=32, n_labels=6, context=8, noise=0.05)
    rng = np.random.default_rng(5)

    def nearest(v):
        return int(np.argmin(((task.prototypes - v) ** 2).sum(-1)))

    for mode in ("bursty", "heldout", "uniform"):
        x, y = task.batch(rng, 20, mode)
        assert x.shape == (20, 17, 8 + 6) and y.shape == (20, 17) and (y[:, :-1] == -100).all()
        for b in range(20):
            ex = x[b, 0:16:2, :8].double().numpy()
            labels = x[b, 1:16:2, 8:].argmax(-1).tolist()
            assert (x[b, 1:16:2, :8] == 0).all() and (x[b, 1:16:2, 8:].sum(-1) == 1).all()
            classes = [nearest(v) for v in ex]  # little noise: the nearest prototype is the class
            query = nearest(x[b, 16, :8].double().numpy())
            target = int(y[b, -1])
            if mode == "uniform":
                assert all(label == c % 6 for c, label in zip(classes, labels)) and target == query % 6
                assert len(set(classes)) == 8 and all(c < 32 for c in classes + [query])
            else:
                assert sorted(set(classes)) == sorted({query, *classes}) and len(set(classes)) == 2
                assert all((c >= 32) == (mode == "heldout") for c in classes)
                mapping = dict(zip(classes, labels))
                assert len(mapping) == 2 and target == mapping[query]  # the context gives the answer
    with pytest.raises(ValueError, match="mode must be"):
        task.batch(rng, 1, "zipf")


def test_token_losses_average_each_position_over_documents_long_enough():
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=30, block_size=16, n_layer=1, n_head=2, n_embd=16))
    g = np.random.default_rng(0)
    docs = [g.integers(0, 30, n).tolist() for n in (20, 5, 16, 40)]
    got, used = science._token_losses(model, docs, 12, windows=8)
    assert used == 3  # the 5-token document is too short
    want = np.zeros(11)
    for d in (docs[0], docs[2], docs[3]):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([d[:11]]))[0].double(), -1)[0]
        want += [-float(logp[i, d[i + 1]]) for i in range(11)]
    np.testing.assert_allclose(got, want / 3, rtol=1e-5)
    with pytest.raises(ValueError, match="no held-out document has 64 tokens"):
        science._token_losses(model, docs, 64, windows=8)
