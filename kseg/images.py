"""Image files for kseg's tools: which files are images, and one decoder (PIL + NumPy only).

    from kseg.images import list_images, read_image
    for path in list_images(["photos/", "cat.jpg"]):
        rgb = read_image(path)            # uint8 [H, W, 3], upright as a viewer shows it

Every command that reads an image file with Pillow (kseg predict, kseg convert / verify
--images, kseg demo) decodes it here, so they agree on colour conversion and on EXIF
orientation: a phone photo stored sideways with an Orientation tag is turned upright first.
The tf.data readers and the TF Serving signatures decode inside the graph with TensorFlow, which
has no EXIF op: they see the stored pixels (a dataset's label maps are aligned with those), and
the readers accept only TF_IMAGE_EXTENSIONS.
"""

from __future__ import annotations

import os

import numpy as np

# Files Pillow reads that kseg treats as images (predict, verify); a directory argument is
# expanded to its files with these suffixes.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm")
# The subset TensorFlow's decoders read (JPEG, PNG, BMP, GIF): the dataset layouts list these.
TF_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")

_MODES = {1: "L", 3: "RGB", 4: "RGBA"}


def list_images(paths) -> list[str]:
    """Image files from files and directories (a directory gives its image files, sorted; not recursive)."""
    out = []
    for p in paths:
        p = os.fspath(p)
        if os.path.isdir(p):
            found = sorted(os.path.join(p, n) for n in os.listdir(p) if n.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise FileNotFoundError(f"{p}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this directory")
            out.extend(found)
        elif os.path.isfile(p):
            out.append(p)
        else:
            raise FileNotFoundError(f"{p} does not exist")
    if not out:
        raise ValueError("no images given")
    return out


def read_image(path, channels: int = 3) -> np.ndarray:
    """An image file as uint8 [H, W, channels] (1: grayscale, 3: RGB, 4: RGBA), turned upright by
    its EXIF orientation (as viewers show it). An unreadable file raises ValueError naming it."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if channels not in _MODES:
        raise ValueError(f"channels must be 1, 3 or 4, got {channels}")
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im)
            array = np.asarray(im.convert(_MODES[channels]))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path} does not exist") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{os.fspath(path)}: cannot read the image ({e})") from None
    return array if array.ndim == 3 else array[..., None]


def save_figure(fig, path) -> str:
    """Write a matplotlib figure as a PNG at `path` atomically (a temporary file renamed into place),
    close it, and return `path`."""
    import matplotlib.pyplot as plt

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp.png"
    try:
        fig.savefig(tmp, dpi=80)
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)
    return path
