"""kseg.serving.export: convert.tf_serving.export, with a detector that takes any input size exported
at its test scale.

    >>> from kseg.serving import export                                             # doctest: +SKIP
    >>> export(kseg.build_model("faster_rcnn_vgg16", weights="frcnn.keras"), "models/frcnn")
    >>> export(model, "models/frcnn", min_size=480, max_size=800)                  # another scale

A Faster R-CNN (input (None, None, 3)) has no network size to resize to: its serving_default and
predict_images resize each image keeping its aspect ratio so that the shorter side is min_size and
the longer at most max_size (the registry spec's test_scales: py-faster-rcnn's TEST.SCALES 600 /
TEST.MAX_SIZE 1000, torchvision's GeneralizedRCNNTransform 800 / 1333, by the model's layout) and
report boxes normalised to the original image (kseg.tasks.detection.any_size_signatures). The scale
travels to the task's signatures as the export's evaluation transform (min_size, max_size,
"bilinear"), recorded in the metadata's serving.eval_transform; the export is verified on two
min_size x min_size images. Every other model goes to convert.tf_serving.export unchanged.
"""

from __future__ import annotations


def export(model, path, *, min_size=None, max_size=None, image_size=None, eval_transform=None, **options) -> str:
    """convert.tf_serving.export(model, path, ...); an any-size detector at its test scale
    (min_size, max_size: default its layout's), where image_size has no meaning and is refused. The scale
    is chosen by convert.tf_serving.serving_size, which `kseg convert --to tf_serving` uses too.
    Returns BASE/NAME/VERSION."""
    from convert.tf_serving import export as export_serving
    from convert.tf_serving import serving_size

    image_size, eval_transform = serving_size(model, image_size, eval_transform, min_size, max_size)
    return export_serving(model, path, image_size=image_size, eval_transform=eval_transform, **options)
