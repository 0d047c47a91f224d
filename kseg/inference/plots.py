"""Pictures of results: the confusion matrix of a classifier (matplotlib, optional); a detector's
boxes and labels drawn on an image (Pillow)."""

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


def class_colour(class_id: int) -> tuple[int, int, int]:
    """A bright RGB colour of a class id, the same in every picture: hues a golden angle apart."""
    import colorsys

    r, g, b = colorsys.hsv_to_rgb((int(class_id) * 0.618033988749895) % 1.0, 0.85, 1.0)
    return int(round(255 * r)), int(round(255 * g)), int(round(255 * b))


def draw_detections(image, detections):
    """A copy of an RGB image (uint8 [H, W, 3]) with each detection's box and its "name score"
    label drawn, in its class's colour (class_colour). detections: [{"class", "name", "score",
    "box": [x1, y1, x2, y2]}] in the image's continuous pixel corners (the box covers pixels
    x1 <= x < x2); the lowest score is drawn first, so the best lies on top. Returns a PIL Image.
    """
    from PIL import Image, ImageDraw, ImageFont

    picture = Image.fromarray(np.asarray(image, np.uint8)).convert("RGB")
    w, h = picture.size
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default()
    line = max(1, round(min(h, w) / 200))
    for d in sorted(detections, key=lambda d: d["score"]):
        colour = class_colour(d["class"])
        x1, y1, x2, y2 = d["box"]
        # The last covered pixel is x2 - 1; a box of at least one pixel.
        left, top = min(max(int(round(x1)), 0), w - 1), min(max(int(round(y1)), 0), h - 1)
        right, bottom = max(min(int(round(x2)) - 1, w - 1), left), max(min(int(round(y2)) - 1, h - 1), top)
        draw.rectangle([left, top, right, bottom], outline=colour, width=line)
        text = f"{d['name']} {d['score']:.2f}"
        tl, tt, tr, tb = draw.textbbox((0, 0), text, font=font)
        tw, th = tr - tl + 2, tb - tt + 2
        ty = top - th if top - th >= 0 else top  # above the box, else inside its top edge
        tx = min(left, max(w - tw, 0))
        draw.rectangle([tx, ty, tx + tw - 1, ty + th - 1], fill=colour)
        dark = 0.299 * colour[0] + 0.587 * colour[1] + 0.114 * colour[2] > 140
        draw.text((tx + 1 - tl, ty + 1 - tt), text, fill=(0, 0, 0) if dark else (255, 255, 255), font=font)
    return picture
