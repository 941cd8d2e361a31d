"""``ferrolm icl experiment label_correctness|flipped_labels|order --model smollm2``: three known
effects of in-context learning, measured on a real model over the classification tasks of the ICL
suite (:mod:`ferrolm.icl.tasks`), each with the paper's finding beside ours.

- ``label_correctness`` (Min et al. 2022, "Rethinking the Role of Demonstrations"): k
  demonstrations with their gold labels against the same demonstrations with labels drawn
  uniformly at random from the label set, and k = 0. Their finding: random labels cost little
  (0–5 points) — the format and the label space matter more than the input–label mapping.
- ``flipped_labels`` (Wei et al. 2023, "Larger language models do in-context learning
  differently"): every demonstration's label flipped (a derangement of the labels: for two labels,
  swapped), and semantically unrelated labels (the label words replaced by ``foo``, ``bar``, ...,
  test questions scored on those words). Their finding: small models keep following their
  semantic priors under flipped labels (accuracy against the gold labels stays up, they do not
  learn the flipped mapping) and drop under unrelated labels; only large models override priors.
- ``order`` (Lu et al. 2022, "Fantastically Ordered Prompts"): one set of k demonstrations shown
  in many permutations; the spread of accuracy over orders, without and with contextual
  calibration (Zhao et al. 2021, which they and Zhao report narrows it).

Results: ``icl_NAME.json`` (settings, runs, summary, the paper's finding), ``icl_NAME.md`` and
``icl_NAME.png``, written atomically.
"""

from __future__ import annotations

import itertools
import json
import math
import statistics
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm.auto import tqdm

from .._io import PathLike, atomic_write
from .._plot import pyplot, save_figure
from ..icl import LM, Example
from ..icl.evaluate import evaluate_classification
from ..icl.prompts import Template
from ..icl.tasks import Task, load_task
from ..metrics import mean_ci

__all__ = [
    "EFFECTS",
    "EffectConfig",
    "random_labels",
    "flip_mapping",
    "flipped_labels",
    "unrelated_template",
    "run_effect",
    "markdown",
]

EFFECTS = ("label_correctness", "flipped_labels", "order")

#: Semantically unrelated label words (Wei et al. 2023 use targets such as "foo" / "bar").
UNRELATED_WORDS = ("foo", "bar", "baz", "qux", "quux", "corge", "grault", "garply")

PAPERS = {
    "label_correctness": "Min et al. 2022: demonstrations with random labels lose only 0-5 points against gold "
    "labels (12 models up to GPT-3 175B, classification and multi-choice); far above k = 0.",
    "flipped_labels": "Wei et al. 2023: with flipped labels small models keep their semantic priors (accuracy "
    "against the gold labels stays well above chance), only large ones (e.g. PaLM-540B) follow the flipped mapping; "
    "semantically unrelated labels hurt small models most.",
    "order": "Lu et al. 2022: the same demonstrations in different orders range from near state-of-the-art to "
    "random-guess accuracy (GPT-2 and GPT-3 sizes); Zhao et al. 2021: contextual calibration raises the mean "
    "and narrows the spread.",
}


@dataclass(frozen=True)
class EffectConfig:
    """Settings of the effect experiments. ``quick()``: two tasks, one seed, 20 test questions."""

    tasks: Tuple[str, ...] = ("parity", "article", "country_continent")
    ks: Tuple[int, ...] = (4, 16)
    seeds: Tuple[int, ...] = (0, 1, 2)
    n_test: int = 100
    order_k: int = 4
    permutations: int = 24

    def __post_init__(self) -> None:
        if not self.tasks or not self.seeds or not self.ks:
            raise ValueError("EffectConfig: tasks, seeds and ks need at least one entry each")
        if any(not isinstance(k, int) or k <= 0 for k in self.ks):
            raise ValueError(f"EffectConfig.ks must be positive ints, got {self.ks}")
        for name in ("n_test", "order_k", "permutations"):
            v = getattr(self, name)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"EffectConfig.{name} must be a positive int, got {v!r}")

    @classmethod
    def quick(cls, tasks: Optional[Sequence[str]] = None) -> "EffectConfig":
        return cls(tasks=tuple(tasks or ("parity", "article")), ks=(4,), seeds=(0,), n_test=20, permutations=6)


# --------------------------------------------------------------------------- label manipulations


def _labels(task: Task) -> List[Any]:
    if task.scoring != "classification":
        raise ValueError(f"task {task.name!r} is scored by exact match; the label effects need a classification task")
    return task.template.choices()


def random_labels(pool: Sequence[Example], labels: Sequence[Any], seed: int) -> List[Example]:
    """The pool with every output replaced by a label drawn uniformly from ``labels`` (Min et al.
    2022: a random label may equal the gold one); inputs and fields unchanged."""
    if len(labels) < 2:
        raise ValueError(f"random labels need at least 2 labels, got {list(labels)}")
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, len(labels), size=len(pool))
    return [Example(e.input, labels[int(j)], e.fields) for e, j in zip(pool, drawn)]


def flip_mapping(labels: Sequence[Any]) -> Dict[Any, Any]:
    """A derangement of the labels (every label goes to another): each to the next in the given
    order, the last to the first; two labels are swapped."""
    labels = list(labels)
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise ValueError(f"flipping needs at least 2 distinct labels, got {labels}")
    return {a: labels[(i + 1) % len(labels)] for i, a in enumerate(labels)}


def flipped_labels(pool: Sequence[Example], mapping: Dict[Any, Any]) -> List[Example]:
    """The pool with every output ``y`` replaced by ``mapping[y]``."""
    missing = sorted({repr(e.output) for e in pool if e.output not in mapping})
    if missing:
        raise ValueError(f"the mapping has no flip for labels {missing}")
    return [Example(e.input, mapping[e.output], e.fields) for e in pool]


def unrelated_template(template: Template, words: Sequence[str] = UNRELATED_WORDS) -> Template:
    """``template`` with each label's word replaced by a semantically unrelated one (in label
    order: ``foo``, ``bar``, ...); the labels themselves, so the examples, stay as they are."""
    labels = template.choices()
    if len(words) < len(labels):
        raise ValueError(f"{len(labels)} labels need as many unrelated words, got {len(words)}")
    return replace(template, label_words={lab: " " + w for lab, w in zip(labels, words)})


# --------------------------------------------------------------------------- the experiments


def _interval(values: Sequence[float]) -> Tuple[float, float, float]:
    m, lo, hi = mean_ci(list(values))
    return m, max(0.0, lo), min(1.0, hi)


def _agreement(preds: Sequence[Any], queries: Sequence[Example], mapping: Optional[Dict[Any, Any]] = None) -> float:
    want = [q.output if mapping is None else mapping[q.output] for q in queries]
    return sum(p == w for p, w in zip(preds, want)) / max(1, len(want))


def _label_runs(lm, tok, task: Task, cfg: EffectConfig, effect: str, bar) -> List[Dict[str, Any]]:
    labels = _labels(task)
    queries = list(task.test[: cfg.n_test])
    runs = []
    base = evaluate_classification(lm, tok, task.pool, queries, task.template, 0)
    runs.append({"task": task.name, "condition": "k=0", "k": 0, "seed": None, "accuracy": base.accuracy})
    mapping = flip_mapping(labels)
    for k in cfg.ks:
        for seed in cfg.seeds:
            conditions: List[Tuple[str, List[Example], Template, Optional[Dict]]] = [
                ("gold", list(task.pool), task.template, None)
            ]
            if effect == "label_correctness":
                conditions.append(("random", random_labels(task.pool, labels, seed), task.template, None))
            else:
                conditions.append(("flipped", flipped_labels(task.pool, mapping), task.template, mapping))
                conditions.append(("unrelated", list(task.pool), unrelated_template(task.template), None))
            for name, pool, template, flip in conditions:
                # the same demonstrations (indices drawn by the seed) in every condition; only labels differ
                res = evaluate_classification(lm, tok, pool, queries, template, k, retriever="random", seed=seed)
                run = {
                    "task": task.name,
                    "condition": name,
                    "k": k,
                    "seed": seed,
                    "accuracy": _agreement(res.predictions, queries),
                    "truncated": res.truncated,
                }
                if flip is not None:
                    run["follows_flipped"] = _agreement(res.predictions, queries, flip)
                if name == "random":
                    shown = {i for d in res.demonstrations for i in d}
                    run["demo_labels_correct"] = sum(pool[i].output == task.pool[i].output for i in shown) / len(shown)
                runs.append(run)
                bar.update()
    return runs


def _order_runs(lm, tok, task: Task, cfg: EffectConfig, bar) -> List[Dict[str, Any]]:
    _labels(task)
    queries = list(task.test[: cfg.n_test])
    k = cfg.order_k
    runs = []
    for seed in cfg.seeds:
        rng = np.random.default_rng(seed)
        chosen = [int(i) for i in rng.choice(len(task.pool), size=k, replace=False)]
        perms = list(itertools.permutations(range(k)))
        picked = rng.choice(len(perms), size=min(cfg.permutations, len(perms)), replace=False)
        for j in sorted(int(p) for p in picked):
            order = [chosen[i] for i in perms[j]]
            for calibrate in (False, True):
                res = evaluate_classification(
                    lm,
                    tok,
                    task.pool,
                    queries,
                    task.template,
                    k,
                    order="as_is",
                    demonstrations=[order] * len(queries),
                    calibrate=calibrate,
                )
                runs.append(
                    {
                        "task": task.name,
                        "seed": seed,
                        "demonstrations": order,
                        "calibrated": calibrate,
                        "accuracy": res.accuracy,
                        "truncated": res.truncated,
                    }
                )
                bar.update()
    return runs


def summary(effect: str, runs: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One row per task and condition (label effects: also per k), mean over seeds with a
    t-interval clipped to [0, 1]; for ``order``, per task and seed the spread over orders."""
    rows: List[Dict[str, Any]] = []
    if effect == "order":
        keys = sorted({(r["task"], r["seed"], r["calibrated"]) for r in runs}, key=lambda t: (t[0], t[1], t[2]))
        for task, seed, cal in keys:
            accs = [r["accuracy"] for r in runs if (r["task"], r["seed"], r["calibrated"]) == (task, seed, cal)]
            rows.append(
                {
                    "task": task,
                    "seed": seed,
                    "calibrated": cal,
                    "orders": len(accs),
                    "mean": statistics.fmean(accs),
                    "min": min(accs),
                    "max": max(accs),
                    "spread": max(accs) - min(accs),
                    "std": statistics.pstdev(accs),
                }
            )
        return rows
    keys = list(dict.fromkeys((r["task"], r["k"], r["condition"]) for r in runs))
    for task, k, cond in keys:
        group = [r for r in runs if (r["task"], r["k"], r["condition"]) == (task, k, cond)]
        m, lo, hi = _interval([r["accuracy"] for r in group])
        row = {"task": task, "k": k, "condition": cond, "seeds": len(group), "accuracy": m, "ci_low": lo, "ci_high": hi}
        if "follows_flipped" in group[0]:
            row["follows_flipped"] = statistics.fmean(r["follows_flipped"] for r in group)
        rows.append(row)
    return rows


def run_effect(
    effect: str,
    model,
    tokenizer,
    config: Optional[EffectConfig] = None,
    out_dir: Optional[PathLike] = "docs/results",
    model_name: str = "",
    progress: bool = True,
) -> Dict[str, Any]:
    """Runs one effect experiment (:data:`EFFECTS`) and returns ``{"experiment", "settings",
    "paper", "runs", "rows", "wall_seconds"}``; with ``out_dir``, writes ``icl_EFFECT.json``,
    ``.md`` and ``.png`` there.

    Raises:
        ValueError: an unknown effect, a task that is not a classification task (the message
            names it), bad settings.
    """
    if effect not in EFFECTS:
        raise ValueError(f"unknown effect {effect!r}; choose from {', '.join(EFFECTS)}")
    cfg = config or EffectConfig()
    tasks = [load_task(name, n_test=cfg.n_test) for name in cfg.tasks]
    for t in tasks:
        _labels(t)
    lm = LM(model, batch_size=16)
    if effect == "order":
        per_task = len(cfg.seeds) * 2 * min(cfg.permutations, math.factorial(cfg.order_k))
    else:
        per_task = len(cfg.ks) * len(cfg.seeds) * (2 if effect == "label_correctness" else 3)
    bar = tqdm(total=per_task * len(tasks), desc=effect, unit="eval", disable=not progress, dynamic_ncols=True)
    t0 = time.perf_counter()
    runs: List[Dict[str, Any]] = []
    try:
        for task in tasks:
            if effect == "order":
                runs += _order_runs(lm, tokenizer, task, cfg, bar)
            else:
                runs += _label_runs(lm, tokenizer, task, cfg, effect, bar)
    finally:
        bar.close()
    res = {
        "experiment": effect,
        "settings": {"model": model_name, **asdict(cfg)},
        "paper": PAPERS[effect],
        "runs": runs,
        "rows": summary(effect, runs),
        "chance": {t.name: 1 / len(t.template.choices()) for t in tasks},
        "wall_seconds": time.perf_counter() - t0,
    }
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        atomic_write(out / f"icl_{effect}.json", json.dumps(res, indent=2).encode())
        atomic_write(out / f"icl_{effect}.md", markdown(res).encode())
        _plot(res, out / f"icl_{effect}.png")
    return res


def markdown(res: Dict[str, Any]) -> str:
    """The effect's table, with the paper's finding under it."""
    if res["experiment"] == "order":
        lines = [
            "| task | demonstration set (seed) | calibrated | orders | mean | min | max | spread | std |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in res["rows"]:
            lines.append(
                f"| {r['task']} | {r['seed']} | {'yes' if r['calibrated'] else 'no'} | {r['orders']} | "
                f"{r['mean']:.3f} | {r['min']:.3f} | {r['max']:.3f} | {r['spread']:.3f} | {r['std']:.3f} |"
            )
    else:
        flips = res["experiment"] == "flipped_labels"
        lines = [
            "| task | k | demonstration labels | accuracy (gold) | 95% CI | seeds |"
            + (" follows the flipped labels |" if flips else ""),
            "|---|---|---|---|---|---|" + ("---|" if flips else ""),
        ]
        for r in res["rows"]:
            tail = ""
            if flips:
                tail = f" {r['follows_flipped']:.3f} |" if "follows_flipped" in r else " |"
            lines.append(
                f"| {r['task']} | {r['k']} | {r['condition']} | {r['accuracy']:.3f} | "
                f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}] | {r['seeds']} |" + tail
            )
    chance = ", ".join(f"{t} {c:.2f}" for t, c in res["chance"].items())
    lines += ["", f"Chance: {chance}. Model: {res['settings']['model'] or 'given'}.", "", f"Paper: {res['paper']}"]
    return "\n".join(lines) + "\n"


def _plot(res: Dict[str, Any], path: Path) -> None:
    try:
        plt = pyplot()
    except ImportError:
        return
    tasks = list(res["chance"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4 * len(tasks), 3.4), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        if res["experiment"] == "order":
            for x, cal in enumerate((False, True)):
                accs = [r["accuracy"] for r in res["runs"] if r["task"] == task and r["calibrated"] == cal]
                ax.scatter(np.full(len(accs), x) + np.linspace(-0.15, 0.15, len(accs)), accs, s=10)
            ax.set_xticks([0, 1], ["uncalibrated", "calibrated"])
            ax.set_ylabel("accuracy per demonstration order")
        else:
            rows = [r for r in res["rows"] if r["task"] == task]
            labels = [f"{r['condition']}\nk={r['k']}" for r in rows]
            acc = np.array([r["accuracy"] for r in rows])
            err = np.array([acc - [r["ci_low"] for r in rows], [r["ci_high"] for r in rows] - acc])
            ax.bar(labels, acc, yerr=err, capsize=2)
            ax.tick_params(axis="x", labelsize=7)
            ax.set_ylabel("accuracy against gold labels")
        ax.axhline(res["chance"][task], color="black", linestyle="--", linewidth=1)
        ax.set_ylim(0, 1.02)
        ax.set_title(task)
    fig.suptitle(res["experiment"].replace("_", " "))
    fig.tight_layout()
    save_figure(fig, path)
