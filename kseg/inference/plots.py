"""Pictures of evaluation results: the confusion matrix of a classifier (matplotlib, optional)."""

from __future__ import annotations

import sys

import numpy as np

from kseg.images import save_figure


def plot_confusion(confusion, path, *, class_names=None, title="") -> str | None:
    """A PNG of a confusion matrix (rows: true class, columns: predicted), each row normalised.

    Needs matplotlib (an optional dependency): without it nothing is written, a note goes to
    stderr and None is returned; else `path`. Class names label the axes up to 40 classes.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed, so {path} was not drawn (pip install matplotlib)", file=sys.stderr)
        return None
    cm = np.asarray(confusion, dtype=np.float64)
    n = cm.shape[0]
    rows = cm.sum(1, keepdims=True)
    share = np.divide(cm, rows, out=np.zeros_like(cm), where=rows > 0)
    side = min(4 + 0.35 * n, 16)
    fig, ax = plt.subplots(figsize=(side + 1, side))
    shown = ax.imshow(share, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    fig.colorbar(shown, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if n <= 40:
        names = list(class_names or [])[:n] + [str(i) for i in range(len(class_names or []), n)]
        ax.set_xticks(range(n), names, rotation=90, fontsize=8)
        ax.set_yticks(range(n), names, fontsize=8)
        if n <= 20:
            for i in range(n):
                for j in range(n):
                    if cm[i, j]:
                        ax.text(j, i, str(int(cm[i, j])), ha="center", va="center", fontsize=7,
                                color="white" if share[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(title or f"confusion matrix ({int(cm.sum())} images)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)
