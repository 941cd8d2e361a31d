"""The ICL task suite (data shipped in num2words, babel and inflect; each task skips when its
package is missing), vote-k against a plain transcription of the algorithm, contextual
calibration and exact-match scoring against direct computation, and ``ferrolm icl eval --task``."""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict

import numpy as np
import pytest

from ferrolm import Tokenizer
from ferrolm.icl import Example, Template, VoteKRetriever
from ferrolm.icl.tasks import TASKS, load_task, task_names


def _load(name, **kw):
    try:
        return load_task(name, **kw)
    except ModuleNotFoundError as e:
        pytest.skip(f"task {name}: {e}")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_every_task_has_a_fixed_disjoint_split_and_a_description(name):
    t = _load(name, n_test=30)
    again = load_task(name, n_test=30)
    assert t.pool == again.pool and t.test == again.test  # the same split on every call
    assert len(t.test) == 30 and len(t.pool) >= 60
    assert not {e.input for e in t.pool} & {e.input for e in t.test}
    assert t.description and "->" in t.description or "sum" in t.description
    assert t.scoring in ("classification", "exact_match")
    if t.scoring == "classification":
        labels = t.template.choices()
        assert {e.output for e in t.pool + t.test} <= set(labels) and len(labels) >= 2
        assert all(w.startswith(" ") for w in t.template.label_words.values())
    prompt = t.template.render(t.pool[:2], Example(t.test[0].input))
    assert prompt.count("Q: ") == 3 and prompt.endswith("\nA:")


def test_task_contents_are_the_packages_data():
    nums = _load("number_french")
    num2words = pytest.importorskip("num2words")
    assert all(num2words.num2words(int(e.input), lang="fr") == e.output for e in nums.test)
    plural = _load("plural", n_test=30)
    by_word = {e.input: e for e in plural.pool + plural.test}
    assert by_word["child"].output == "children"
    assert "hooves" in plural.answers(by_word["hoof"]) and "hoofs" in plural.answers(by_word["hoof"])
    add = _load("addition", n_test=10)
    assert all(int(e.output) == sum(int(x) for x in e.input.split(" + ")) for e in add.test)
    cont = _load("country_continent")
    europe = {e.input for e in cont.pool + cont.test if e.output == "Europe"}
    assert {"France", "Germany"} & europe


def test_unknown_task_and_missing_package_say_how_to_fix(monkeypatch):
    with pytest.raises(ValueError, match="unknown ICL task 'antonymz'; the tasks are: addition, article"):
        load_task("antonymz")
    from ferrolm.recipes.icl_tasks import resolve_tasks

    assert resolve_tasks("all") == task_names()
    with pytest.raises(ValueError, match="the tasks are: all, addition"):
        resolve_tasks("plural,nope")
    monkeypatch.setitem(sys.modules, "babel", None)  # import babel now raises ImportError
    with pytest.raises(ModuleNotFoundError, match=r"babel package, which is not installed: pip install babel"):
        load_task("country_currency")


def _votek_reference(x, select_num, k, rho=10.0):
    """Vote-k as Su et al. (2022) / OpenICL write it, with dicts (ties to the lower index)."""
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(x)
    votes = defaultdict(list)  # candidate -> voters
    for i in range(n):
        sims = x @ x[i]
        sims[i] = -np.inf
        for j in sorted(range(n), key=lambda j: (-sims[j], j))[:k]:
            votes[j].append(i)
    chosen, times = [], defaultdict(int)
    while len(chosen) < select_num:
        scores = {}
        for u in range(n):
            if u in chosen:
                continue
            scores[u] = sum(rho ** -times[v] for v in votes[u] if v not in chosen)
        best = max(scores, key=lambda u: (scores[u], -u))
        chosen.append(best)
        for v in votes[best]:
            times[v] += 1
    return chosen


def test_votek_matches_the_plain_algorithm():
    rng = np.random.default_rng(0)
    for trial in range(4):
        x = rng.normal(size=(40, 6)) + (rng.integers(0, 4, size=(40, 1)) == np.arange(6)) * 3  # clusters
        for k in (1, 3, 5):
            assert VoteKRetriever(x, n_neighbors=k).select(8) == _votek_reference(x, 8, k)
    r = VoteKRetriever(x, n_neighbors=3)
    first = r.select(4)
    got = r.retrieve(3, 3, query_pool_index=[first[0], None, first[2]])
    assert got == [first[1:4], first[:3], [first[0], first[1], first[3]]]
    with pytest.raises(ValueError, match="exceeds"):
        r.retrieve(1, 41)


@pytest.fixture(scope="module")
def tiny():
    torch = pytest.importorskip("torch")
    from ferrolm.models import GPT, GPTConfig

    texts = ["yes no maybe", "one two three four", "Q: a\nA: b", "N/A [MASK]"] * 3
    tok = Tokenizer.train(texts, vocab_size=300, special_tokens=["<|endoftext|>"])
    torch.manual_seed(1)
    return tok, GPT(GPTConfig(vocab_size=tok.n_vocab, block_size=256, n_layer=1, n_head=2, n_embd=16)).eval()


def test_contextual_calibration_divides_by_the_content_free_distribution(tiny):
    from ferrolm.icl import LM, evaluate_classification

    tok, model = tiny
    ex = [Example(w, w in ("one", "three")) for w in ["one", "two", "three", "four", "yes", "no", "maybe", "two"]]
    tpl = Template(demo="Q: {input}\nA:{label}", query="Q: {input}\nA:", label_words={False: " no", True: " yes"})
    pool, queries = ex[:5], ex[5:]
    res = evaluate_classification(LM(model), tok, pool, queries, tpl, k=2, seed=3, calibrate=True)
    lm = LM(model, batch_size=1)
    words = [tok.encode_ordinary(" no"), tok.encode_ordinary(" yes")]

    def label_logprobs(prompt):
        s = [r.logprob for r in lm.loglikelihood([(tok.encode_ordinary(prompt), w) for w in words], reuse_prefix=False)]
        z = math.log(sum(math.exp(v) for v in s))
        return [v - z for v in s]

    for q, d, pred in zip(queries, res.demonstrations, res.predictions):
        demos = [pool[i] for i in reversed(d)]
        cf = [label_logprobs(tpl.render(demos, Example(c))) for c in ("N/A", "", "[MASK]")]
        prior = [math.log(sum(math.exp(c[j]) for c in cf) / 3) for j in range(2)]
        lp = label_logprobs(tpl.render(demos, Example(q.input)))
        scores = [lp[j] - prior[j] for j in range(2)]
        assert pred == (scores[1] > scores[0])
    plain = evaluate_classification(LM(model), tok, pool, queries, tpl, k=2, seed=3)
    assert plain.demonstrations == res.demonstrations


def test_exact_match_compares_the_greedy_line_with_every_accepted_answer(tiny):
    from ferrolm.icl import LM, evaluate_exact_match

    tok, model = tiny
    pool = [Example(f"q{i}", f"a{i}") for i in range(6)]
    queries = [Example("one", "two", {"answers": ("deux",)}), Example("three", "four"), Example("yes", "no")]

    class Scripted(LM):
        """Generations fixed in advance, to check the scoring alone."""

        def generate_until(self, requests, tokenizer=None):
            self.seen = requests
            return [" deux\n", "five", " no "][: len(requests)]

    lm = Scripted(model, tok)
    res = evaluate_exact_match(
        lm,
        tok,
        pool,
        queries,
        Template(demo="Q: {input}\nA: {output}", query="Q: {input}\nA:"),
        k=2,
        answers=lambda q: [q.output, *q.fields.get("answers", ())],
    )
    assert res.predictions == ["deux", "five", "no"] and res.accuracy == pytest.approx(2 / 3)
    assert res.macro_f1 is None and all(stop == ["\n"] for _, stop, _ in lm.seen)
    # And with the model's own generations: the prediction is LM.generate_until's line.
    real = evaluate_exact_match(
        LM(model, tok), tok, pool, queries, Template(demo="{input}={output}", query="{input}="), k=1
    )
    assert len(real.predictions) == 3 and 0.0 <= real.accuracy <= 1.0


def test_cli_icl_eval_runs_the_suite(tmp_path, capsys):
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    from ferrolm.cli import main
    from ferrolm.models import Llama, LlamaConfig

    tok = Tokenizer.train(
        ["0 1 2 3 4 5 6 7 8 9 + = even odd Q: A:"] * 4, vocab_size=300, special_tokens=["<|endoftext|>"]
    )
    d = tmp_path / "m"
    d.mkdir()
    tok.save_hf_json(d / "tokenizer.json")
    import torch

    torch.manual_seed(0)
    Llama(LlamaConfig(vocab_size=tok.n_vocab, block_size=256, n_layer=1, n_head=2, n_embd=16, ff_size=32)).save(
        d / "model.safetensors"
    )
    out = tmp_path / "res"
    rc = main(
        [
            "icl",
            "eval",
            "--model",
            str(d),
            "--task",
            "addition,parity",
            "--k",
            "0,2",
            "--seeds",
            "2",
            "--n-test",
            "6",
            "--retriever",
            "votek",
            "--calibrate",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| addition | exact match |" in printed and "| parity | classes |" in printed
    res = json.loads((out / "icl_tasks.json").read_text())
    assert res["settings"]["retriever"] == "votek" and res["settings"]["calibrate"] is True
    assert [r["k"] for r in res["tasks"]["parity"]["table"]] == [0, 2]
    assert res["tasks"]["parity"]["n_test"] == 6 and res["tasks"]["parity"]["table"][1]["seeds"] == 2
    assert (out / "icl_tasks.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["icl", "eval", "--model", str(d), "--task", "antonymz"]) == 2
    assert "unknown ICL task 'antonymz'; the tasks are: all, addition" in capsys.readouterr().err


def test_merge_suites_joins_tasks_of_equal_settings_and_refuses_the_rest():
    from ferrolm.recipes.icl_tasks import merge_suites

    a = {"settings": {"ks": [0, 1], "seeds": [0]}, "tasks": {"plural": {"table": [1]}}}
    b = {"settings": {"ks": [0, 1], "seeds": [0]}, "tasks": {"parity": {"table": [2]}}}
    m = merge_suites([a, b])
    assert list(m["tasks"]) == ["plural", "parity"] and m["settings"] == a["settings"]
    with pytest.raises(ValueError, match="more than one"):
        merge_suites([a, a])
    with pytest.raises(ValueError, match=r"\['seeds'\]"):
        merge_suites([a, {"settings": {"ks": [0, 1], "seeds": [0, 1]}, "tasks": {}}])
