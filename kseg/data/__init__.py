"""kseg.data: tf.data pipelines for real dataset layouts, a dataset checker, a synthetic dataset.

    ds = kseg.data.voc("VOCdevkit/VOC2012", "train", augment=True, batch_size=8,
                       preprocessing="vgg16")   # or "caffe", or None
    model.fit(ds, ...)   # labels int32 [B, H, W, 1], 255 = ignore

    det = kseg.data.voc_detection("VOCdevkit/VOC2007", "trainval", size=(300, 300), batch_size=32)
    # (images, {"boxes": [B, 100, 4] xyxy px, "classes": [B, 100] (-1 pad), "difficult", "image_shape"})

    sk = kseg.data.sk_large("SK-LARGE", "train", flip=True, batch_size=1, preprocessing="fsds")
    # (images, radius float32 [B, H, W, 1]: each skeleton pixel's distance to the boundary, 0 elsewhere)

A dataset knows no network: this package imports kseg.registry (for preprocessing specs)
but never kseg.models, kseg.train or kseg.cli.

Every name loads its module on first use (PEP 562): `kseg data synth` / `kseg data check` and
palette I/O start without TensorFlow, and the `kseg` command's parsers without even NumPy.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_LAZY = {
    "CheckReport": "check",
    "check_dataset": "check",
    "LAYOUTS": "layouts",
    "PETS_CLASSES": "layouts",
    "list_source": "layouts",
    "IGNORE_LABEL": "palette",
    "VOC_CLASSES": "palette",
    "colorize": "palette",
    "overlay": "palette",
    "read_label": "palette",
    "rgb_to_index": "palette",
    "voc_palette": "palette",
    "write_label": "palette",
    "SYNTH_CLASSES": "synth",
    "make_synthetic": "synth",
    "make_synthetic_detection": "synth",
    "DETECTION_LAYOUTS": "detection",
    "DetectionSource": "detection",
    "coco_detection": "detection",
    "list_coco": "detection",
    "list_voc_detection": "detection",
    "voc_detection": "detection",
    "ClassificationAugment": "augment",
    "SegmentationAugment": "augment",
    "random_erasing": "erasing",
    "rand_augment": "randaugment",
    "SkipLog": "pipeline",
    "resolve_preprocessing": "pipeline",
    "classification_folder": "readers",
    "classification_list": "readers",
    "edges": "readers",
    "folder": "readers",
    "pets": "readers",
    "sbd": "readers",
    "synthetic": "readers",
    "tfrecord": "readers",
    "voc": "readers",
    "write_tfrecord": "readers",
    "sk_large": "skeleton",
    "skeleton_splits": "skeleton",
}
_SUBMODULES = {"augment", "check", "cli", "decode", "detection", "erasing", "layouts", "palette", "pipeline",
               "randaugment", "readers", "skeleton", "spec", "synth"}

if TYPE_CHECKING:  # for static tools; at run time these load lazily
    from kseg.data.augment import ClassificationAugment, SegmentationAugment  # noqa: F401
    from kseg.data.check import CheckReport, check_dataset  # noqa: F401
    from kseg.data.detection import (  # noqa: F401
        DETECTION_LAYOUTS,
        DetectionSource,
        coco_detection,
        list_coco,
        list_voc_detection,
        voc_detection,
    )
    from kseg.data.erasing import random_erasing  # noqa: F401
    from kseg.data.layouts import LAYOUTS, PETS_CLASSES, list_source  # noqa: F401
    from kseg.data.palette import (  # noqa: F401
        IGNORE_LABEL,
        VOC_CLASSES,
        colorize,
        overlay,
        read_label,
        rgb_to_index,
        voc_palette,
        write_label,
    )
    from kseg.data.pipeline import SkipLog, resolve_preprocessing  # noqa: F401
    from kseg.data.randaugment import rand_augment  # noqa: F401
    from kseg.data.readers import (  # noqa: F401
        classification_folder,
        classification_list,
        edges,
        folder,
        pets,
        sbd,
        synthetic,
        tfrecord,
        voc,
        write_tfrecord,
    )
    from kseg.data.skeleton import sk_large, skeleton_splits  # noqa: F401
    from kseg.data.synth import SYNTH_CLASSES, make_synthetic, make_synthetic_detection  # noqa: F401


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(f"kseg.data.{_LAZY[name]}"), name)
        globals()[name] = value
        return value
    if name in _SUBMODULES:
        return importlib.import_module(f"kseg.data.{name}")
    raise AttributeError(f"module 'kseg.data' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY) | _SUBMODULES)


__all__ = [
    "DETECTION_LAYOUTS", "IGNORE_LABEL", "LAYOUTS", "PETS_CLASSES", "SYNTH_CLASSES", "VOC_CLASSES",
    "CheckReport", "ClassificationAugment", "DetectionSource", "SegmentationAugment", "SkipLog",
    "check_dataset", "classification_folder", "classification_list", "coco_detection", "colorize", "edges",
    "folder", "list_coco", "list_source", "list_voc_detection",
    "make_synthetic", "make_synthetic_detection", "overlay", "pets", "rand_augment", "random_erasing", "read_label",
    "resolve_preprocessing",
    "rgb_to_index", "sbd", "sk_large", "skeleton_splits", "synthetic", "tfrecord", "voc", "voc_detection",
    "voc_palette", "write_label",
    "write_tfrecord",
]
