"""ICL toolkit: examples and templates, retrievers against brute-force Python versions, BM25
against its formula, metrics against independent computations, k-shot evaluation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ferrolm import Tokenizer
from ferrolm.icl import (
    BM25Retriever,
    Example,
    FixedRetriever,
    RandomRetriever,
    Template,
    TopKRetriever,
    load_examples,
    order_demos,
)
from ferrolm.metrics import accuracy, bits_per_byte, exact_match, macro_f1, mean_ci, perplexity

# --------------------------------------------------------------------------- prompts


def test_template_renders_exactly():
    t = Template(
        demo="Q: {input}\nA:{label}",
        query="Q: {input}\nA:",
        separator="\n\n",
        instruction="Classify.\n\n",
        label_words={"pos": " yes", "neg": " no"},
    )
    got = t.render([Example("a b", "pos"), Example(" c ", "neg")], Example("d", None))
    assert got == "Classify.\n\nQ: a b\nA: yes\n\nQ:  c \nA: no\n\nQ: d\nA:"
    assert t.render([], Example("d")) == "Classify.\n\nQ: d\nA:"
    assert t.choices() == ["pos", "neg"]
    with pytest.raises(ValueError, match="refers to field 'topic'"):
        Template(demo="{topic}: {input}").render_demo(Example("x", 1))
    with pytest.raises(ValueError, match="no label word"):
        t.render_demo(Example("x", "other"))
    assert (
        Template(demo="[{source}] {input} -> {output}").render_demo(Example("x", "y", {"source": "web"}))
        == "[web] x -> y"
    )
    with pytest.raises(ValueError, match="label_words is empty"):
        Template(label_words={})


def test_load_examples_jsonl_csv_and_errors(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"input": "a", "label": 1, "src": "s"}\n\n{"input": "b", "output": "x"}\n')
    ex = load_examples(p)
    assert ex[0] == Example("a", 1, {"src": "s"}) and ex[1].output == "x"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"input": "a", "label": 1}\n{"input": "b", "label": \n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: not valid JSON"):
        load_examples(bad)
    miss = tmp_path / "miss.jsonl"
    miss.write_text('{"text": "a", "label": 1}\n')
    with pytest.raises(ValueError, match=r"miss.jsonl:1: missing field 'input'"):
        load_examples(miss)
    c = tmp_path / "d.csv"
    c.write_text("input,label\nhello,1\nworld,0\n")
    assert [e.input for e in load_examples(c)] == ["hello", "world"]
    with pytest.raises(FileNotFoundError):
        load_examples(tmp_path / "none.jsonl")
    assert load_examples([{"input": "q", "label": 0}])[0].input == "q"


# --------------------------------------------------------------------------- retrievers


def _bm25_brute(docs, q, k1=1.5, b=0.75):
    n = len(docs)
    avgdl = sum(map(len, docs)) / n
    out = []
    for d in docs:
        s = 0.0
        for t in q:
            df = sum(t in x for x in docs)
            tf = d.count(t)
            idf = math.log(1 + (n - df + 0.5) / (df + 0.5))
            s += idf * tf * (k1 + 1) / (tf + k1 * (1 - b + b * len(d) / avgdl)) if tf else 0.0
        out.append(s)
    return out


def test_bm25_matches_formula_and_brute_force_top_k():
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 30, rng.integers(1, 25)).tolist() for _ in range(60)]
    queries = [rng.integers(0, 30, rng.integers(1, 8)).tolist() for _ in range(15)]
    r = BM25Retriever(docs)
    for qi, q in enumerate(queries):
        want = _bm25_brute(docs, q)
        np.testing.assert_allclose(r.scores(q), want, rtol=1e-12, atol=1e-12)
    got = r.retrieve(queries, 5, query_pool_index=list(range(15)))
    for qi, q in enumerate(queries):
        s = _bm25_brute(docs, q)
        order = sorted((i for i in range(60) if i != qi), key=lambda i: (-s[i], i))
        assert got[qi] == order[:5]
    with pytest.raises(ValueError, match="exceeds"):
        r.retrieve(queries[:1], 60, query_pool_index=[0])


def test_random_and_fixed_retrievers():
    r = RandomRetriever(20, seed=3)
    a = r.retrieve(10, 4, query_pool_index=list(range(10)))
    assert a == RandomRetriever(20, seed=3).retrieve(10, 4, query_pool_index=list(range(10)))
    assert a != RandomRetriever(20, seed=4).retrieve(10, 4, query_pool_index=list(range(10)))
    for q, d in enumerate(a):
        assert len(set(d)) == 4 and q not in d and all(0 <= i < 20 for i in d)
    f = FixedRetriever(20, [5, 2, 9])
    assert f.retrieve(3, 3) == [[5, 2, 9]] * 3
    assert f.retrieve(1, 3, query_pool_index=[2]) == [[5, 9, 0]]
    with pytest.raises(ValueError, match="outside the pool"):
        FixedRetriever(3, [3])


def test_topk_and_mmr_match_brute_force():
    rng = np.random.default_rng(1)
    pool = rng.normal(size=(40, 8))
    queries = rng.normal(size=(6, 8))
    unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    sims = unit(queries) @ unit(pool).T
    got = TopKRetriever(pool).retrieve(queries, 5, query_pool_index=[0, -1, 2, -1, 4, -1])
    for i in range(6):
        s = sims[i].copy()
        if i in (0, 2, 4):
            s[i] = -np.inf
        assert got[i] == sorted(range(40), key=lambda j: (-s[j], j))[:5]
    lam = 0.3
    mmr = TopKRetriever(pool, mmr_lambda=lam).retrieve(queries, 4)
    pair = unit(pool) @ unit(pool).T
    for i in range(6):
        chosen = []
        for _ in range(4):
            best = max(
                (j for j in range(40) if j not in chosen),
                key=lambda j: (lam * sims[i, j] - (1 - lam) * (max(pair[j, c] for c in chosen) if chosen else 0.0), -j),
            )
            chosen.append(best)
        assert mmr[i] == chosen
    assert order_demos([1, 2, 3]) == [3, 2, 1] and order_demos([1, 2, 3], "most_relevant_first") == [1, 2, 3]


# --------------------------------------------------------------------------- metrics


def test_metrics_against_direct_computation():
    pred, gold = ["a", "b", "a", "c", "b"], ["a", "b", "b", "c", "c"]
    assert accuracy(pred, gold) == 3 / 5
    # per class: a: tp1 fp1 fn0 -> 2/3; b: tp1 fp1 fn1 -> 1/2; c: tp1 fp0 fn1 -> 2/3
    assert macro_f1(pred, gold) == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    assert macro_f1(pred, gold, labels=["a", "b", "c", "d"]) == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 4)
    assert exact_match(["The Cat!", "dog"], ["cat", "a dog"]) == 1.0
    assert exact_match(["The Cat!"], ["cat"], normalise=False) == 0.0
    assert perplexity(-10 * math.log(4), 10) == pytest.approx(4.0)
    assert bits_per_byte(-8 * math.log(2), 4) == pytest.approx(2.0)
    m, lo, hi = mean_ci([0.5, 0.6, 0.7])
    assert m == pytest.approx(0.6) and hi - m == pytest.approx(4.302652729 * 0.1 / math.sqrt(3), rel=1e-6)
    with pytest.raises(ValueError):
        accuracy([1], [1, 2])


# --------------------------------------------------------------------------- evaluation


@pytest.fixture(scope="module")
def tiny_task():
    torch = pytest.importorskip("torch")
    from ferrolm.models import GPT, GPTConfig

    texts = [
        "good fine great nice",
        "bad awful poor sad",
        "great good nice",
        "poor bad sad awful",
        "nice good",
        "sad bad",
    ] * 3
    labels = [1, 0, 1, 0, 1, 0] * 3
    tok = Tokenizer.train(texts + [" positive negative"], vocab_size=300)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=tok.n_vocab, block_size=256, n_layer=1, n_head=2, n_embd=16)).eval()
    ex = [Example(t, y) for t, y in zip(texts, labels)]
    tpl = Template(
        demo="{input} ->{label}", query="{input} ->", separator="\n", label_words={0: " negative", 1: " positive"}
    )
    return tok, model, ex, tpl


@pytest.mark.parametrize("retriever", ["random", "fixed", "bm25"])
def test_evaluate_classification_predictions_are_the_best_scored_label(tiny_task, retriever):
    from ferrolm.icl import LM, evaluate_classification

    tok, model, ex, tpl = tiny_task
    pool, queries = ex[:12], ex[12:]
    res = evaluate_classification(LM(model, batch_size=3), tok, pool, queries, tpl, k=3, retriever=retriever, seed=1)
    lm = LM(model, batch_size=1)
    words = [tok.encode_ordinary(" negative"), tok.encode_ordinary(" positive")]
    for q, d, p in zip(queries, res.demonstrations, res.predictions):
        prompt = tpl.render([pool[i] for i in reversed(d)], Example(q.input))
        s = [r.logprob for r in lm.loglikelihood([(tok.encode_ordinary(prompt), w) for w in words], reuse_prefix=False)]
        assert p == (1 if s[1] > s[0] else 0)
    assert res.accuracy == accuracy(res.predictions, [q.output for q in queries])
    again = evaluate_classification(LM(model, batch_size=8), tok, pool, queries, tpl, k=3, retriever=retriever, seed=1)
    assert again.predictions == res.predictions and again.demonstrations == res.demonstrations


def test_kshot_sweep_table_json_plot(tiny_task, tmp_path):
    from ferrolm.icl import LM, kshot_sweep

    tok, model, ex, tpl = tiny_task
    sweep = kshot_sweep(LM(model), tok, ex[:12], ex[12:], tpl, ks=(0, 1, 2), seeds=(0, 1), progress=False)
    table = sweep.table()
    assert [r["k"] for r in table] == [0, 1, 2] and [r["seeds"] for r in table] == [1, 2, 2]
    for r in table:
        accs = [x.accuracy for x in sweep.runs if x.k == r["k"]]
        assert r["accuracy"] == pytest.approx(sum(accs) / len(accs))
    sweep.save_json(tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["table"][0]["k"] == 0
    sweep.plot(tmp_path / "r.png")
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert "| 2 | 2 |" in sweep.markdown()


def test_embedded_task_is_deterministic_and_disjoint():
    from ferrolm.icl.tasks import DEFAULT_PACKAGES, stdlib_package_task

    pool, test, tpl = stdlib_package_task(per_class=8, test_per_class=3)
    again, test2, _ = stdlib_package_task(per_class=8, test_per_class=3)
    assert pool == again and test == test2
    assert len(pool) == 8 * len(DEFAULT_PACKAGES) and len(test) == 3 * len(DEFAULT_PACKAGES)
    assert not {e.input for e in pool} & {e.input for e in test}
    assert sorted(tpl.choices()) == sorted(DEFAULT_PACKAGES)
    assert all(e.output in DEFAULT_PACKAGES and len(e.input) >= 20 for e in pool + test)
    with pytest.raises(ValueError, match="no package"):
        stdlib_package_task(packages=("no_such_pkg_here",))


def test_cli_icl_eval_writes_table_json_plot(tmp_path):
    import subprocess
    import sys

    torch = pytest.importorskip("torch")
    from ferrolm.corpus import default_corpus
    from ferrolm.models import GPT, GPTConfig

    tok = Tokenizer.train(default_corpus(200_000), vocab_size=400)
    tok.save_hf_json(tmp_path / "tokenizer.json")
    torch.manual_seed(0)
    GPT(GPTConfig(vocab_size=tok.n_vocab, block_size=512, n_layer=1, n_head=2, n_embd=16)).save(
        tmp_path / "model.safetensors"
    )
    out = tmp_path / "res"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ferrolm.cli",
            "icl",
            "eval",
            "--model",
            str(tmp_path),
            "--k",
            "0,1",
            "--seeds",
            "2",
            "--retriever",
            "bm25",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    table = json.loads((out / "icl.json").read_text())["table"]
    assert [r["k"] for r in table] == [0, 1] and table[1]["seeds"] == 2
    assert 0.0 <= table[0]["accuracy"] <= 1.0
    assert (out / "icl.png").read_bytes()[:4] == b"\x89PNG" and "| k |" in (out / "icl.md").read_text()
    data = tmp_path / "d.jsonl"
    data.write_text(
        "\n".join(json.dumps({"input": f"item {i}", "label": "yes" if i % 2 else "no"}) for i in range(20))
        + "\n{broken\n"
    )
    bad = subprocess.run(
        [sys.executable, "-m", "ferrolm.cli", "icl", "eval", "--model", str(tmp_path), "--data", str(data)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert bad.returncode == 2 and "d.jsonl:21: not valid JSON" in bad.stderr and "Traceback" not in bad.stderr


def test_bleu_equals_sacrebleu():
    sacrebleu = pytest.importorskip("sacrebleu")
    from ferrolm.metrics import corpus_bleu, tokenize_13a

    hyps = [
        "The cat sat on the mat.",
        "It is 3.5 km - far-away, isn't it?",
        "Hello &amp; goodbye",
        "a",
        "Numbers 1,000.5 and 2-3 (x)",
    ]
    refs = [
        [
            "The cat is on the mat.",
            "It is 3.5 km, far away; is it not?",
            "Hello & good-bye",
            "a b c d e",
            "numbers 1,000.5 and 2 - 3 x",
        ],
        ["There is a cat on the mat", "Far, 3.5 km away.", "hello and goodbye", "a", "Numbers: 1,000.5 & 2-3"],
    ]
    for kw in ({}, {"lowercase": True}, {"tokenize": "none"}):
        for r in (refs, refs[:1]):
            assert corpus_bleu(hyps, r, **kw) == pytest.approx(sacrebleu.corpus_bleu(hyps, r, **kw).score, abs=1e-9)
    rng = np.random.default_rng(0)
    words = [
        "the",
        "a",
        "cat",
        "dog",
        "sat",
        "on",
        "mat",
        ",",
        ".",
        "3.5",
        "x-y",
        "(",
        ")",
        "I'm",
        "&amp;",
        "Über",
        "中文",
    ]
    for _ in range(20):
        hyps = [" ".join(rng.choice(words, rng.integers(0, 12))) for _ in range(6)]
        refs = [
            [" ".join(rng.choice(words, rng.integers(1, 12))) for _ in range(6)] for _ in range(int(rng.integers(1, 4)))
        ]
        assert corpus_bleu(hyps, refs) == pytest.approx(sacrebleu.corpus_bleu(hyps, refs).score, abs=1e-9)
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

    t13 = Tokenizer13a()
    for h in hyps + ["a-b 1-2 3.4, x.y &quot;q&quot; <skipped>z-\nw"]:
        assert tokenize_13a(h) == t13(h)
    with pytest.raises(ValueError, match="one string per hypothesis"):
        corpus_bleu(["a"], [["a", "b"]])


def test_cli_icl_eval_on_a_hugging_face_folder(tmp_path):
    import subprocess
    import sys

    transformers = pytest.importorskip("transformers")
    from ferrolm.corpus import default_corpus

    tok = Tokenizer.train(default_corpus(100_000), vocab_size=300)
    hf = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=tok.n_vocab, n_positions=512, n_embd=16, n_layer=1, n_head=2)
    )
    hf.save_pretrained(tmp_path)
    tok.save_hf_json(tmp_path / "tokenizer.json")
    data = tmp_path / "d.jsonl"
    data.write_text(
        "\n".join(
            json.dumps({"input": f"item {i} " + "ab" * (i % 3), "label": "yes" if i % 2 else "no"}) for i in range(20)
        )
        + "\n"
    )
    out = tmp_path / "res"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "ferrolm.cli",
            "icl",
            "eval",
            "--model",
            str(tmp_path),
            "--data",
            str(data),
            "--k",
            "0,2",
            "--seeds",
            "1",
            "--demo",
            "Q: {input}\\nA:{label}",
            "--query",
            "Q: {input}\\nA:",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert [r["k"] for r in json.loads((out / "icl.json").read_text())["table"]] == [0, 2]


def test_sweep_table_intervals_clipped_and_wilson_over_pooled_answers():
    from ferrolm.icl.evaluate import ClassificationResult, SweepResult

    runs = [
        ClassificationResult(0, 0, 0.9, None, predictions=list(range(10))),
        ClassificationResult(4, 0, 1.0, None, predictions=list(range(10))),
        ClassificationResult(4, 1, 0.6, None, predictions=list(range(10))),
    ]
    t = {r["k"]: r for r in SweepResult(runs).table()}
    z = 1.959963984540054  # the normal 97.5% quantile

    def wilson(x, n):  # Wilson's score interval, written out
        p = x / n
        mid = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
        return mid - half, mid + half

    assert t[0]["answers"] == 10 and t[4]["answers"] == 20
    for k, (x, n) in ((0, (9, 10)), (4, (16, 20))):
        lo, hi = wilson(x, n)
        assert t[k]["wilson_low"] == pytest.approx(lo, abs=1e-12)
        assert t[k]["wilson_high"] == pytest.approx(hi, abs=1e-12)
    # two seeds 0.6 and 1.0: the t interval (12.71 * 0.2) runs past both ends and is clipped
    assert t[4]["ci_low"] == 0.0 and t[4]["ci_high"] == 1.0 and t[4]["accuracy"] == pytest.approx(0.8)
    assert t[0]["ci_low"] == t[0]["ci_high"] == pytest.approx(0.9)
