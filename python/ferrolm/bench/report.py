"""The one renderer of benchmark results: a ratio line per row (the progress of ``ferrolm bench`` and the summary of
``pytest benchmarks``), a text table per area, the Markdown report, the bar chart of ratios and the one-line summary
of the machine. A ratio is always the peer's median time over ferrolm's, so above 1 means ferrolm is faster.
"""

from __future__ import annotations

import os
from typing import Dict, List, Mapping

from .._plot import pyplot, save_figure
from .harness import Result

__all__ = ["LEGEND", "ratio_line", "text_table", "extra_lines", "markdown_report", "plot_ratios", "machine_summary"]

LEGEND = "x vs peer = peer time / ferrolm time (higher is better for ferrolm); medians of repeated runs."

Extra = Mapping[str, Mapping[str, float]]


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.4g}"


def ratio_line(r: Result) -> str:
    """One row on one line: ``[area] workload (size): ferrolm 12.3 ms | peer 3.21x | ...``.

    The area and size parts are left out when empty; without a ferrolm time the peers' times are shown instead of
    ratios.
    """
    head = (f"[{r.area}] " if r.area else "") + r.workload + (f" ({r.size})" if r.size else "")
    ours = r.seconds.get("ferrolm")
    if not ours:
        return head + ": " + " | ".join(f"{k} {_ms(v)} ms" for k, v in r.seconds.items())
    return head + f": ferrolm {_ms(ours)} ms" + "".join(f" | {k} {x:.2f}x" for k, x in sorted(r.ratios().items()))


def _peers(rows: List[Result]) -> List[str]:
    return sorted({k for r in rows for k in r.seconds if k != "ferrolm"})


def _cells(r: Result, peers: List[str], bold: bool) -> List[str]:
    """workload, size, ferrolm ms, each peer's ms, each peer's ratio ("-" where a peer did not run)."""
    ratios = r.ratios()
    mark = "**" if bold else ""
    return (
        [r.workload, r.size, _ms(r.seconds["ferrolm"]) if "ferrolm" in r.seconds else "-"]
        + [_ms(r.seconds[p]) if p in r.seconds else "-" for p in peers]
        + [f"{mark}{ratios[p]:.2f}x{mark}" if p in ratios else "-" for p in peers]
    )


def _head(peers: List[str]) -> List[str]:
    return ["workload", "size", "ferrolm ms"] + [f"{p} ms" for p in peers] + [f"x vs {p}" for p in peers]


def _by_area(results: List[Result]) -> Dict[str, List[Result]]:
    out: Dict[str, List[Result]] = {}
    for r in results:
        out.setdefault(r.area, []).append(r)
    return out


def text_table(results: List[Result]) -> str:
    """One aligned plain-text table per area, headed ``[area]``, ferrolm's ms, each peer's ms and ratio."""
    blocks = []
    for area, rows_in in _by_area(results).items():
        peers = _peers(rows_in)
        rows = [_head(peers)] + [_cells(r, peers, bold=False) for r in rows_in]
        widths = [max(len(x) for x in col) for col in zip(*rows)]
        fmt = "  ".join("{:<%d}" % w for w in widths)
        lines = [f"[{area}]", fmt.format(*rows[0]).rstrip(), "  ".join("-" * w for w in widths)]
        lines += [fmt.format(*row).rstrip() for row in rows[1:]]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def extra_lines(extra: Extra) -> List[str]:
    """``name: a=1.2345, b=...`` for each extra measurement (e.g. bytes per token on held-out text)."""
    return [f"{k}: " + ", ".join(f"{a}={b:.4f}" for a, b in v.items()) for k, v in extra.items()]


def machine_summary() -> str:
    """One line on the machine and library versions the numbers come from."""
    import platform

    parts = [f"{os.cpu_count()} CPUs", platform.machine(), f"Python {platform.python_version()}"]
    try:
        import torch

        parts.append(f"torch {torch.__version__} ({torch.get_num_threads()} threads)")
    except ImportError:
        pass
    for mod in ("tiktoken", "tokenizers", "transformers"):
        try:
            parts.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    parts.insert(0, line.split(":", 1)[1].strip())
                    break
    except OSError:
        pass
    return ", ".join(parts)


def markdown_report(results: List[Result], extra: Extra, full: bool) -> str:
    """The results as a Markdown document: one table per area, ferrolm's speed-up per peer in bold."""
    mode = "full" if full else "quick"
    lines = [
        "# ferrolm benchmark report",
        "",
        f"Mode: {mode}. Machine: {machine_summary()}.",
        "",
        "Ratio = peer median time / ferrolm median time (above 1: ferrolm is faster). Runs interleaved, medians.",
        "",
    ]
    for area, rows in _by_area(results).items():
        peers = _peers(rows)
        lines += [f"## {area}", "", "| " + " | ".join(_head(peers)) + " |", "|" + "---|" * (3 + 2 * len(peers))]
        lines += ["| " + " | ".join(_cells(r, peers, bold=True)) + " |" for r in rows]
        lines.append("")
    lines += [f"- {line}" for line in extra_lines(extra)]
    return "\n".join(lines) + "\n"


def plot_ratios(results: List[Result], path: str) -> bool:
    """Writes a horizontal bar chart of ferrolm's speed-up per workload and peer (log scale, a line at 1x) to
    ``path`` as PNG; returns False (with a note) when matplotlib is missing or there is no ratio to draw."""
    try:
        plt = pyplot()
    except ImportError as e:
        print(f"plot skipped: {e}")
        return False
    bars = [(f"[{r.area}] {r.workload} vs {p}", ratio, r.area) for r in results for p, ratio in r.ratios().items()]
    if not bars:
        return False
    areas = list(dict.fromkeys(a for _, _, a in bars))
    colors = {a: plt.get_cmap("tab10")(i % 10) for i, a in enumerate(areas)}
    fig, ax = plt.subplots(figsize=(11, 0.32 * len(bars) + 1.5))
    y = list(range(len(bars)))[::-1]
    ax.barh(y, [b[1] for b in bars], color=[colors[b[2]] for b in bars])
    ax.set_yticks(y)
    ax.set_yticklabels([b[0][:110] for b in bars], fontsize=7)
    ax.set_xscale("log")
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xlabel("speed-up of ferrolm (peer time / ferrolm time, log scale)")
    ax.set_title("ferrolm vs references, same machine, same run")
    for yi, (_, ratio, _a) in zip(y, bars):
        ax.text(ratio, yi, f" {ratio:.2f}x", va="center", fontsize=7)
    fig.subplots_adjust(left=0.5, right=0.97, top=1 - 0.6 / fig.get_figheight(), bottom=0.7 / fig.get_figheight())
    save_figure(fig, path)
    return True
