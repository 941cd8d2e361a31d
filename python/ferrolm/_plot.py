"""The one plotting helper: matplotlib on its file-only backend, figures saved atomically.

Every chart the package writes (benchmark ratios, k-shot curves, experiment results) goes
through :func:`pyplot` and :func:`save_figure`, so the backend choice, the missing-matplotlib
message and the write-then-rename rule live in one place.
"""

from __future__ import annotations

import io

from ._io import PathLike, atomic_write

__all__ = ["pyplot", "save_figure"]


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (no display needed).

    Raises:
        ImportError: matplotlib is not installed, with the command that installs it.
    """
    try:
        import matplotlib
    except ImportError as e:
        raise ImportError("plotting needs matplotlib; pip install matplotlib") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: PathLike, dpi: int = 110) -> None:
    """Writes ``fig`` as PNG to ``path`` (temporary name, then rename) and closes it."""
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi)
    finally:
        pyplot().close(fig)
    atomic_write(path, buf.getvalue())
