"""One call per published dataset layout -> a tf.data.Dataset of (image, label) for model.fit.

Each reader lists its layout's files (kseg.data.layouts, in Python, once) and hands them
to kseg.data.pipeline, which decodes, validates and augments in parallel graph ops.

Elements: images float32 [H, W, 3] (RGB 0..255, or preprocessed when preprocessing= is
given); segmentation labels int32 [H, W, 1] (class index, 255 = ignore), the shape
Keras' SparseCategoricalCrossentropy(ignore_class=255) and MeanIoU accept; edge labels
float32 [H, W, 1] in [0, 1]; classification labels int32 scalars (one-hot float32 with
label_mode="categorical", mixup or cutmix).

Common options (keyword-only, every segmentation reader):
  augment: None (eval), True (SegmentationAugment() defaults) or a SegmentationAugment.
  preprocessing: None (raw 0..255), a kseg.Preprocessing, a kind ("caffe", "torch",
      "unit", "tf", "batchnorm") or a model name whose registry spec decides.
  batch_size: None (unbatched) or an int. Full-size images batch only with resize= or
      pad_to= (or a crop in augment); pad_to pads with the mean colour and label 255.
  shuffle: default True when augmenting. seed: makes order and augmentation
      reproducible. deterministic: default True (element order kept; False lets the
      parallel maps reorder). cache: True (memory) or a file path; caches decoded,
      validated pairs before augmentation.
  skip_bad: False (a bad file raises, naming it) or True / a SkipLog (bad files are
      skipped, warned about and recorded in `dataset.skipped`).
  resize: (h, w) fixed resize before augmentation (bilinear image, nearest label).
"""

from __future__ import annotations

from kseg.data.layouts import (
    list_classification,
    list_classification_list,
    list_edges,
    list_folder,
    list_pets,
    list_source,
    list_voc,
)
from kseg.data.pipeline import (
    classification_dataset,
    read_tfrecord_source,
    segmentation_dataset,
)
from kseg.data.pipeline import write_tfrecord as _write_tfrecord

# === public readers ===

def voc(root, split="train", *, num_classes=None, **options):
    """PASCAL VOC 2012 segmentation: JPEGImages + SegmentationClass palette PNGs + ImageSets/Segmentation/<split>.txt.

    `root` is VOCdevkit/VOC2012 (or VOCdevkit). `split` is a list name or a list file path.
    num_classes defaults to 21, or to the lines of root/classes.txt when present.
    """
    return segmentation_dataset(list_voc(root, split, num_classes=num_classes), **options)


def sbd(root, split="train_aug", *, num_classes=None, **options):
    """SBD-augmented VOC: SegmentationClassAug/*.png + a list (names, or DeepLab's 'image label' pairs)."""
    return segmentation_dataset(list_voc(root, split, labels="SegmentationClassAug", num_classes=num_classes),
                                **options)


def synthetic(root, split="train", **options):
    """The built-in synthetic dataset written by `kseg data synth` (VOC layout, 5 classes)."""
    return segmentation_dataset(list_voc(root, split), **options)


def pets(root, split="trainval", *, border="own", **options):
    """Oxford-IIIT Pet trimaps. border: "own" (3 classes: background, pet, border), "ignore"
    (border -> 255) or "foreground" (border -> pet)."""
    return segmentation_dataset(list_pets(root, split, border=border), **options)


def edges(list_file, root=None, *, threshold=None, **options):
    """HED / BSDS500 edge maps from a list of 'image edge_map' pairs.

    Labels are float32 [H, W, 1]: edge strength / 255, or (strength >= threshold * 255) as 0/1
    when threshold is given. Padding (scale < 1 with a crop) is labelled 0, no edge.
    """
    return segmentation_dataset(list_edges(list_file, root), threshold=threshold, **options)


def folder(root, *, images="images", masks="masks", num_classes=None, palette=None, label_map=None,
           class_names=None, **options):
    """A folder of your own: root/images/* and root/masks/*.png matched by file stem.

    Masks are index PNGs ('P' palette or 'L' grayscale; values 0..num_classes-1, 255 = ignore).
    palette="voc" or an (N, 3) array also accepts RGB colour masks, mapping each colour to its
    index; a colour not in the palette is an error. label_map={raw: class} renames raw values
    first, e.g. {255: 1} for 0/255 binary masks.
    """
    source = list_folder(root, images=images, masks=masks, num_classes=num_classes, palette=palette,
                         label_map=label_map, class_names=class_names)
    return segmentation_dataset(source, **options)


def classification_folder(root, *, image_size=None, channels=None, class_names=None, preprocessing=None,
                          **options):
    """One folder per class -> (image float32 [h, w, channels], label int32).

    image_size / channels default to the model's input when preprocessing= is a model name
    (e.g. "lenet5" -> 32x32x1), else 224x224x3. augment= takes a ClassificationAugment
    (random resized crop, flip, jitter, mixup / cutmix / cutout); without it images are
    resized to image_size, or with eval_transform=(resize_shorter, crop) resized by their
    shorter side and centre-cropped (interpolation= names the resize method).
    """
    source = list_classification(root, class_names=class_names)
    return _classification(source, image_size, channels, preprocessing, options)


def classification_list(path, split=None, *, root=None, image_size=None, channels=None, class_names=None,
                        num_classes=None, preprocessing=None, **options):
    """An annotation list (mmpretrain's CustomDataset form) -> (image float32 [h, w, channels], label int32).

    `path` is a text file of 'relative/path.jpg LABEL' lines (images relative to its folder, or
    to root=), or a dataset folder with `split`: DIR/<split>.txt, or mmpretrain's ImageNet
    layout DIR/meta/<split>.txt with images under DIR/<split>/. Class names come from
    class_names=, a classes.txt next to the list, or num_classes=; a bad line or a label out of
    range raises, naming the file and line. Other options as classification_folder.
    """
    source = list_classification_list(path, split, root=root, class_names=class_names, num_classes=num_classes)
    return _classification(source, image_size, channels, preprocessing, options)


def _classification(source, image_size, channels, preprocessing, options):
    if preprocessing is not None and isinstance(preprocessing, str):
        from kseg.registry import PREPROCESSING, get_spec

        if preprocessing not in PREPROCESSING:
            h, w, c = get_spec(preprocessing).input_shape
            if options.get("eval_transform") is None:
                image_size = image_size or ((h, w) if h and w else None)
            channels = channels or c
    if options.get("eval_transform") is None:
        image_size = image_size or (224, 224)
    return classification_dataset(source, image_size=image_size, channels=channels or 3,
                                  preprocessing=preprocessing, **options)


def tfrecord(path, *, image_size=None, channels=None, **options):
    """Read TFRecord shards written by write_tfrecord, with the same options as the readers."""
    source = read_tfrecord_source(path)
    if source.spec.kind == "class":
        return classification_dataset(source, image_size=image_size or (224, 224), channels=channels or 3,
                                      **options)
    return segmentation_dataset(source, **options)


def write_tfrecord(path, layout: str, root, *, shards: int = 1, progress: bool = True,
                   **list_options) -> list[str]:
    """List a dataset (same layouts and options as the readers) and write its files to TFRecord.

    kseg.data.write_tfrecord("voc_train.tfrecord", "voc", "VOCdevkit/VOC2012", split="train")
    """
    return _write_tfrecord(list_source(layout, root, **list_options), path, shards, progress=progress)
