"""The ICL effect experiments (label correctness, flipped / unrelated labels, demonstration
order): the manipulated tasks carry exactly the labels they claim, fixed demonstration orders are
scored as a hand-rendered prompt is, and each experiment's quick form on a tiny random Llama gives
complete, bounded rows."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from ferrolm.corpus import default_corpus  # noqa: E402
from ferrolm.icl import LM, Example  # noqa: E402
from ferrolm.icl.evaluate import evaluate_classification  # noqa: E402
from ferrolm.icl.tasks import load_task  # noqa: E402
from ferrolm.models import Llama, LlamaConfig  # noqa: E402
from ferrolm.recipes import icl_effects as fx  # noqa: E402
from ferrolm.tokenizer import Tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    tok = Tokenizer.train(default_corpus(60_000), vocab_size=300)
    torch.manual_seed(0)
    model = Llama(LlamaConfig(vocab_size=tok.n_vocab, block_size=512, n_layer=1, n_head=2, n_embd=32, ff_size=64))
    return model.eval(), tok


def test_random_labels_are_uniform_draws_independent_of_gold():
    task = load_task("country_continent")
    labels = task.template.choices()
    got = fx.random_labels(task.pool, labels, seed=3)
    assert [(e.input, e.fields) for e in got] == [(e.input, e.fields) for e in task.pool]
    assert all(e.output in labels for e in got)
    assert [e.output for e in fx.random_labels(task.pool, labels, seed=3)] == [e.output for e in got]
    assert [e.output for e in fx.random_labels(task.pool, labels, seed=4)] != [e.output for e in got]
    n = len(got)
    counts = {lab: sum(e.output == lab for e in got) for lab in labels}
    # every label drawn about n / 5 times (5 labels), whatever the gold distribution is
    assert all(abs(c - n / 5) < 4 * (n * 0.2 * 0.8) ** 0.5 for c in counts.values()), counts
    agree = sum(a.output == b.output for a, b in zip(got, task.pool)) / n
    assert abs(agree - 1 / 5) < 0.12  # independent of the gold label
    with pytest.raises(ValueError, match="at least 2 labels"):
        fx.random_labels(task.pool, ["Asia"], 0)


@pytest.mark.parametrize("name", ["parity", "country_continent"])
def test_flipped_labels_map_every_demonstration_to_another_label(name):
    task = load_task(name)
    labels = task.template.choices()
    mapping = fx.flip_mapping(labels)
    assert sorted(mapping) == sorted(labels) and sorted(mapping.values()) == sorted(labels)  # a bijection
    assert all(mapping[a] != a for a in labels)  # no label kept
    if len(labels) == 2:
        assert mapping == {labels[0]: labels[1], labels[1]: labels[0]}
    flipped = fx.flipped_labels(task.pool, mapping)
    for f, g in zip(flipped, task.pool):
        assert f.input == g.input and f.output == mapping[g.output] != g.output
    # what the model reads: the flipped label word after each demonstration's input
    q = Example(task.test[0].input, None)
    text = task.template.render(flipped[:3], q)
    for g in task.pool[:3]:
        assert f"Q: {g.input}\nA:{task.template.label_words[mapping[g.output]]}" in text
    with pytest.raises(ValueError, match="at least 2 distinct labels"):
        fx.flip_mapping(["a", "a"])


def test_unrelated_labels_swap_only_the_words():
    task = load_task("article")
    t = fx.unrelated_template(task.template)
    assert t.choices() == task.template.choices()
    assert list(t.label_words.values()) == [" foo", " bar"]
    text = t.render(task.pool[:4], Example(task.test[0].input, None))
    for g in task.pool[:4]:
        word = dict(zip(task.template.choices(), [" foo", " bar"]))[g.output]
        assert f"Q: {g.input}\nA:{word}" in text
    assert " an\n" not in text and not text.endswith(" an")


def test_fixed_demonstration_orders_score_as_the_hand_rendered_prompt(tiny):
    model, tok = tiny
    task = load_task("parity", n_test=8)
    lm = LM(model)
    order = [5, 1, 9, 3]
    res = evaluate_classification(
        lm, tok, task.pool, task.test, task.template, 4, order="as_is", demonstrations=[order] * 8
    )
    labels = task.template.choices()
    words = [tok.encode_ordinary(task.template.label_words[c]) for c in labels]
    want = []
    for q in task.test:
        prompt = "\n\n".join(
            [f"Q: {task.pool[i].input}\nA: {task.pool[i].output}" for i in order] + [f"Q: {q.input}\nA:"]
        )
        with torch.no_grad():
            ctx = torch.tensor([tok.encode_ordinary(prompt)])
            scores = []
            for w in words:
                ids = torch.cat([ctx, torch.tensor([w])], 1)
                logp = torch.log_softmax(model(ids[:, :-1])[0].double(), -1)[0]
                scores.append(sum(logp[ctx.size(1) - 1 + j, t].item() for j, t in enumerate(w)))
        want.append(labels[max(range(len(labels)), key=lambda j: (scores[j], -j))])
    assert res.predictions == want
    assert res.demonstrations == [order] * 8
    with pytest.raises(ValueError, match="one per query\\) of k=4 pool indices"):
        evaluate_classification(lm, tok, task.pool, task.test, task.template, 4, demonstrations=[order])
    with pytest.raises(ValueError, match="outside \\[0, 400\\)"):
        evaluate_classification(lm, tok, task.pool, task.test, task.template, 4, demonstrations=[[0, 1, 2, 400]] * 8)


def test_quick_effects_on_a_tiny_llama(tiny, tmp_path):
    model, tok = tiny
    cfg = fx.EffectConfig(tasks=("parity", "country_continent"), ks=(2,), seeds=(0, 1), n_test=8, permutations=5)

    res = fx.run_effect("label_correctness", model, tok, cfg, tmp_path, progress=False)
    rows = {(r["task"], r["condition"]): r for r in res["rows"]}
    assert sorted(rows) == sorted((t, c) for t in cfg.tasks for c in ("k=0", "gold", "random"))
    for r in res["rows"]:
        assert 0 <= r["ci_low"] <= r["accuracy"] <= r["ci_high"] <= 1
        assert r["seeds"] == (1 if r["condition"] == "k=0" else 2)
    rand = [r for r in res["runs"] if r["condition"] == "random"]
    assert all(0 <= r["demo_labels_correct"] <= 1 for r in rand)
    assert (tmp_path / "icl_label_correctness.json").is_file() and "Min et al. 2022" in (
        tmp_path / "icl_label_correctness.md"
    ).read_text()

    res = fx.run_effect("flipped_labels", model, tok, cfg, tmp_path, progress=False)
    conds = sorted({(r["task"], r["condition"]) for r in res["rows"]})
    assert conds == sorted((t, c) for t in cfg.tasks for c in ("k=0", "gold", "flipped", "unrelated"))
    for r in res["runs"]:
        if r["condition"] == "flipped" and r["task"] == "parity":
            # two labels: every prediction is either the gold or the flipped label
            assert r["follows_flipped"] == pytest.approx(1 - r["accuracy"])

    res = fx.run_effect("order", model, tok, cfg, tmp_path, progress=False)
    assert len(res["runs"]) == 2 * 2 * 5 * 2  # tasks x seeds x orders x (calibrated or not)
    for r in res["rows"]:
        assert r["orders"] == 5 and 0 <= r["min"] <= r["mean"] <= r["max"] <= 1
        assert r["spread"] == pytest.approx(r["max"] - r["min"])
    for t in cfg.tasks:
        for s in cfg.seeds:
            shown = [tuple(r["demonstrations"]) for r in res["runs"] if r["task"] == t and r["seed"] == s]
            assert len(set(shown)) == 5 and all(sorted(o) == sorted(shown[0]) for o in shown)  # one set, 5 orders


def test_generation_tasks_are_refused_by_name(tiny):
    model, tok = tiny
    with pytest.raises(ValueError, match="task 'addition' is scored by exact match"):
        fx.run_effect("flipped_labels", model, tok, fx.EffectConfig(tasks=("addition",)), None, progress=False)
    with pytest.raises(ValueError, match="unknown effect 'flip'"):
        fx.run_effect("flip", model, tok)


def test_cli_names_unknown_experiments_and_misplaced_options(capsys):
    from ferrolm import cli

    assert cli.main(["icl", "experiment", "bogus"]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment 'bogus'; choose from regression, recall, induction, fewshot, label_correctness" in err
    assert cli.main(["icl", "experiment", "regression", "--model", "smollm2"]) == 2
    assert "--model and --tasks go with label_correctness, flipped_labels, order" in capsys.readouterr().err
    assert cli.main(["icl", "experiment", "order", "--tasks", "parity,nope"]) == 2
    assert "unknown ICL task 'nope'" in capsys.readouterr().err
