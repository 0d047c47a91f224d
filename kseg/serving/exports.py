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

from kseg import identity as md


def detector_scale(model, min_size=None, max_size=None) -> tuple[int, int] | None:
    """(min_size, max_size) an any-size detector is exported at (its rule, each value given replacing
    the rule's); None for any other model, which refuses min_size / max_size."""
    from kseg.tasks.detection import resolve_scale

    task = md.task_of(model)
    detector, any_size = task.target_kind == "boxes", not all(model.input_shape[1:3])
    if not (detector and any_size):
        if min_size is not None or max_size is not None:
            what = "a fixed-input detector" if detector else f"a {task.name} model"
            raise ValueError(f"min_size / max_size (--min-size / --max-size) set the test scale of a detector that "
                             f"takes any input size; {model.name} is {what}")
        return None
    ident = md.identify(model)
    spec = ident.spec if ident else None
    return resolve_scale(spec.test_scales if spec else None, (ident.options if ident else {}).get("layout"),
                         min_size, max_size, name=ident.architecture if ident else None)


def export(model, path, *, min_size=None, max_size=None, image_size=None, eval_transform=None, **options) -> str:
    """convert.tf_serving.export(model, path, ...); an any-size detector at its test scale
    (min_size, max_size: default its layout's), where image_size has no meaning and is refused.
    Returns BASE/NAME/VERSION."""
    from convert.tf_serving import export as export_serving

    scale = detector_scale(model, min_size, max_size)
    if scale is None:
        return export_serving(model, path, image_size=image_size, eval_transform=eval_transform, **options)
    if image_size is not None:
        raise ValueError(f"{model.name} takes images of any size: its export resizes each image keeping the aspect "
                         f"ratio to its test scale (shorter side {scale[0]}, longer at most {scale[1]}; "
                         "min_size / max_size, --min-size / --max-size, change it), not to image_size "
                         "(--image-size)")
    return export_serving(model, path, image_size=(scale[0], scale[0]), eval_transform=(*scale, "bilinear"),
                          **options)
