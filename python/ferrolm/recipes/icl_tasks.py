"""The k-shot table of a model on ferrolm's ICL task suite (:mod:`ferrolm.icl.tasks`), behind
``ferrolm icl eval --task NAME|all``: every task swept over k and seeds, one markdown table
(task x k: mean accuracy and 95% interval), ``icl_tasks.json`` (tables, runs, settings, wall
time) and ``icl_tasks.png`` (accuracy against k, one line per task).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

from .._io import PathLike, atomic_write
from .._plot import pyplot, save_figure
from ..icl.evaluate import SweepResult, task_sweep
from ..icl.tasks import load_task, task_names

__all__ = ["resolve_tasks", "run_suite", "merge_suites", "write_suite", "suite_markdown", "plot_suite"]


def resolve_tasks(spec: str) -> List[str]:
    """Task names from ``"all"`` or a comma-separated list.

    Raises:
        ValueError: an unknown name (the message lists the names).
    """
    if spec == "all":
        return task_names()
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in task_names()]
    if unknown or not names:
        raise ValueError(
            f"unknown ICL task {', '.join(map(repr, unknown or [spec]))}; the tasks are: all, {', '.join(task_names())}"
        )
    return names


def run_suite(
    lm,
    tokenizer,
    names: Sequence[str],
    ks: Sequence[int] = (0, 1, 2, 4, 8, 16),
    seeds: Sequence[int] = (0, 1, 2),
    n_test: int = 100,
    retriever: str = "random",
    embed: Optional[Callable] = None,
    calibrate: bool = False,
    out_dir: Optional[PathLike] = None,
    model_name: str = "",
    progress: bool = True,
) -> Dict[str, Any]:
    """Sweeps every task of ``names`` and returns ``{"settings", "tasks": {name: {description,
    scoring, source, n_pool, n_test, table, runs, seconds}}}``; with ``out_dir``, also writes
    ``icl_tasks.md``, ``icl_tasks.json`` and ``icl_tasks.png`` there (the plot is skipped
    without matplotlib)."""
    out: Dict[str, Any] = {
        "settings": {
            "model": model_name,
            "ks": list(ks),
            "seeds": list(seeds),
            "n_test": n_test,
            "retriever": retriever,
            "calibrate": calibrate,
        },
        "tasks": {},
    }
    for name in names:
        task = load_task(name, n_test=n_test)
        t0 = time.perf_counter()
        sweep: SweepResult = task_sweep(
            lm,
            tokenizer,
            task,
            ks=ks,
            seeds=seeds,
            progress=progress,
            retriever=retriever,
            embed=embed,
            calibrate=calibrate,
        )
        out["tasks"][name] = {
            "description": task.description,
            "scoring": task.scoring,
            "source": task.source,
            "n_pool": len(task.pool),
            "n_test": len(task.test),
            "table": sweep.table(),
            "runs": [{k: v for k, v in asdict(r).items() if k != "demonstrations"} for r in sweep.runs],
            "seconds": time.perf_counter() - t0,
        }
    if out_dir is not None:
        write_suite(out, out_dir)
    return out


def write_suite(result: Dict[str, Any], out_dir: PathLike, stem: str = "icl_tasks") -> None:
    """Writes ``stem.json``, ``stem.md`` and ``stem.png`` (the plot skipped without matplotlib)."""
    d = Path(out_dir)
    d.mkdir(parents=True, exist_ok=True)
    atomic_write(d / f"{stem}.json", json.dumps(result, indent=2, default=str).encode())
    atomic_write(d / f"{stem}.md", suite_markdown(result).encode())
    try:
        plot_suite(result, d / f"{stem}.png")
    except ImportError:
        pass


def merge_suites(results: Sequence[Dict[str, Any]]) -> Dict[str, Any]:
    """One suite result from several runs of :func:`run_suite` (say one process per task) with
    the same settings but different tasks, in the order given.

    Raises:
        ValueError: settings that differ (the keys named) or a task in two of them.
    """
    if not results:
        raise ValueError("merge_suites needs at least one result")
    first = results[0]["settings"]
    out: Dict[str, Any] = {"settings": dict(first), "tasks": {}}
    for r in results[1:]:
        diff = sorted(k for k in set(first) | set(r["settings"]) if first.get(k) != r["settings"].get(k))
        if diff:
            raise ValueError(f"suite results differ in settings {diff}; merge runs of the same settings only")
    for r in results:
        for name, t in r["tasks"].items():
            if name in out["tasks"]:
                raise ValueError(f"task {name!r} is in more than one of the results")
            out["tasks"][name] = t
    return out


def suite_markdown(result: Dict[str, Any]) -> str:
    """One row per task: its scoring, then the mean accuracy over seeds at each k with the
    Wilson 95% interval of all its answers pooled (seeds x test questions)."""
    ks = result["settings"]["ks"]
    lines = [
        "| task | scoring | " + " | ".join(f"k={k}" for k in ks) + " |",
        "|---|---|" + "---|" * len(ks),
    ]
    for name, t in result["tasks"].items():
        by_k = {r["k"]: r for r in t["table"]}
        cells = []
        for k in ks:
            r = by_k.get(k)
            if r is None:
                cells.append("")
                continue
            lo, hi = r.get("wilson_low", r["ci_low"]), r.get("wilson_high", r["ci_high"])
            cells.append(f"{r['accuracy']:.3f} [{lo:.2f}, {hi:.2f}]")
        kind = "classes" if t["scoring"] == "classification" else "exact match"
        lines.append(f"| {name} | {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_suite(result: Dict[str, Any], path: PathLike) -> None:
    """Accuracy against k (symlog axis), one line per task, with its 95% band."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    ks = result["settings"]["ks"]
    for i, (name, t) in enumerate(result["tasks"].items()):
        rows = t["table"]
        x = [r["k"] for r in rows]
        # past the 10 colours of the cycle, dashed lines keep the tasks apart
        ax.plot(x, [r["accuracy"] for r in rows], marker="o", label=name, linestyle="-" if i < 10 else "--")
        lo = [r.get("wilson_low", r["ci_low"]) for r in rows]
        ax.fill_between(x, lo, [r.get("wilson_high", r["ci_high"]) for r in rows], alpha=0.12)
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xticks(ks)
    ax.set_xticklabels([str(k) for k in ks])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("demonstrations k")
    ax.set_ylabel("accuracy")
    model = (result["settings"].get("model") or "model").split(" (")[0]  # the name, not its notes
    ax.set_title(f"{model}: in-context learning on ferrolm's task suite")
    ax.legend(fontsize=7, ncol=2, loc="upper left")
    fig.tight_layout()
    save_figure(fig, path)
