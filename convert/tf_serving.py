"""SavedModels for TensorFlow Serving: the layout BASE/NAME/VERSION/ with image-level signatures.

An export holds a `tf.Module` (no Keras, no kseg code): it loads with `tf.saved_model.load`
in a process that never imported kseg, and TensorFlow Serving (`tensorflow_model_server`,
the official Docker image) serves it as it is. Signatures:

- `serving_default`: input `images`, a float32 NHWC batch of RGB values 0..255 (as decoded
  from image files); the registry's preprocessing runs inside the graph. Outputs
  `probabilities` (softmax; sigmoid for edge models) and `label_map` (per-pixel argmax,
  int32; edge models: probability > 0.5) for dense models, `probabilities` and `classes`
  for classifiers.
- `predict_images`: input `image_bytes`, a batch of encoded JPEG/PNG/GIF/BMP strings (REST
  clients send `{"b64": ...}`). Each image is decoded, resized to the export's network size
  (bilinear) and preprocessed in the graph. Outputs `label_map` at each image's original size
  (the batch is padded to its largest image with -1; `image_size` gives each one's height and
  width), `probabilities` at the network size, and `image_size`. Classifiers return
  `classes` and `probabilities` instead of the label map.
- `raw_outputs`: the model's own outputs (logits) for an already preprocessed float batch
  `image`: what `kseg convert` writes as `serving_default`, kept for conversions back to Keras.

A detector that takes any input size (Faster R-CNN: input (None, None, 3)) has no network size:
`serving_size` gives it its test scale (min_size, max_size: the registry spec's test_scales,
py-faster-rcnn's TEST.SCALES 600 / TEST.MAX_SIZE 1000 or torchvision's GeneralizedRCNNTransform
800 / 1333 by its layout) as the export's evaluation transform, and the detection task's
signatures resize each image keeping its aspect ratio to it and report boxes normalised to the
original image (kseg.tasks.detection.any_size_signatures). `kseg convert --to tf_serving`
(save_format, `--min-size` / `--max-size`) and `kseg export --serving` (kseg.serving.export) both
go through it, so they write the same module.

The kseg metadata (architecture, build options, classes, preprocessing, and a `serving`
entry describing the signatures) is `assets/kseg.json`. Every variable is reachable as
`kseg_weights[<Keras weight path>]`, so `convert.api.load_keras("BASE/NAME")` rebuilds Keras.

Example:
    >>> import kseg
    >>> from convert.tf_serving import export
    >>> model = kseg.build_model("deeplab_largefov", num_classes=5, width=0.125)
    >>> path = export(model, "/tmp/models/deeplab", image_size=(64, 64))  # doctest: +SKIP
    >>> path                                                               # doctest: +SKIP
    '/tmp/models/deeplab/1'
"""

from __future__ import annotations

import io
import os
import warnings

from convert import saved_model as saved_model_format
from convert.api import as_kseg_model, load_keras
from convert.io import atomic_output
from convert.saved_model import serving_function, serving_version_dir
from kseg import identity as md
from kseg.api import build_model
from kseg.identity import resolve_preprocessing
from kseg.progress import stages
from kseg.registry import PREPROCESSING, list_models
from kseg.tasks import get_task
from kseg.tasks.base import Serving

# Every export has these; a task adds its own (Task.image_signatures: classify_images, ...).
SIGNATURES = ("serving_default", "predict_images", "label_images", "raw_outputs")
LABEL_PAD = -1
# Decoded images larger than this are refused in the graph (a small PNG can decode to gigabytes).
MAX_IMAGE_PIXELS = 4096 * 4096


class ExportVerificationError(ValueError):
    """The exported signatures disagree with the Keras model; nothing was written."""


def _task_and_head(model, meta):
    """(task, Head) of the serving head of a kseg (or plain Keras) model."""
    task = md.task_of(model)
    try:
        head = task.head(list(model.output_names), md.of_metadata(meta).options,
                         output_rank=len(model.outputs[0].shape))
    except ValueError as e:
        raise ValueError(f"{model.name}: {e}") from None
    return task, head


def _network_size(model, meta, image_size):
    """(height, width) the predict_images signature resizes every image to."""
    fixed = model.input_shape[1:3]
    if all(d is not None for d in fixed):
        if image_size is not None and tuple(image_size) != tuple(fixed):
            raise ValueError(f"{model.name} has a fixed input size {fixed[0]}x{fixed[1]}; "
                             f"image_size={tuple(image_size)} does not fit it")
        return tuple(int(d) for d in fixed)
    if image_size is not None:
        h, w = (int(d) for d in image_size)
        if h < 1 or w < 1:
            raise ValueError(f"image_size must be positive, got {image_size}")
        return h, w
    spec = md.of_metadata(meta).spec
    if spec is not None:
        h, w, _ = spec.input_shape
        if h and w:
            return int(h), int(w)
    raise ValueError(f"{model.name} accepts any input size; pass image_size=(height, width) for predict_images")


def _preprocessing(meta, preprocessing):
    if preprocessing is not None:
        return resolve_preprocessing(preprocessing)
    known = md.of_metadata(meta).preprocessing
    if known is not None:
        return known
    raise ValueError("the model has no kseg metadata, so its preprocessing is unknown; pass preprocessing= "
                     f"(one of {sorted(PREPROCESSING)} or a registry model name)")


def build_module(model, *, image_size=None, preprocessing=None, class_names=None,
                 max_image_pixels=MAX_IMAGE_PIXELS, eval_transform=None):
    """(tf.Module with the three signatures, metadata dict) for a Keras model."""
    import tensorflow as tf

    if len(model.inputs) > 1:  # Fast R-CNN: image and proposals
        raise ValueError(f"{model.name} takes inputs {[t.name for t in model.inputs]}; the TF Serving export's "
                         "signatures take images only: write a SavedModel instead (its serving_default takes every "
                         "input)")
    meta = md.build_metadata(model, class_names=class_names)
    if eval_transform is None:  # the model's own: its training run's, or its named weights'
        eval_transform = meta.get("eval_transform")
    task, head_ = _task_and_head(model, meta)
    index, activation = head_.output_index, head_.activation
    pre = _preprocessing(meta, preprocessing)
    height, width = _network_size(model, meta, image_size)
    channels = int(model.input_shape[-1])
    input_hw = list(model.input_shape[1:3])

    def head(images):
        """float RGB 0..255 batch -> (probabilities, labels)."""
        out = model(pre.apply(images), training=False)
        out = out[index] if isinstance(out, (list, tuple)) else out
        if activation == "softmax":
            probs = tf.nn.softmax(out, axis=-1)
        elif activation == "softmax_negated":
            probs = tf.nn.softmax(-out, axis=-1)
        elif activation == "sigmoid":
            probs = tf.sigmoid(out)
        else:
            probs = tf.identity(out)
        return probs, task.labels(probs)

    @tf.function(input_signature=[tf.TensorSpec([None, *input_hw, channels], tf.float32, name="images")])
    def serve(images):
        probs, labels = head(images)
        key = task.serving_key
        return {"probabilities": tf.identity(probs, name="probabilities"), key: tf.identity(labels, name=key)}

    def decode_raw(data):
        image = tf.io.decode_image(data, channels=channels, dtype=tf.uint8, expand_animations=False)
        size = tf.shape(image)[:2]
        tf.debugging.assert_less_equal(
            tf.cast(size[0], tf.int64) * tf.cast(size[1], tf.int64), tf.constant(max_image_pixels, tf.int64),
            message=f"image too large: more than {max_image_pixels} pixels")
        return image, size

    def decode(data):
        image, size = decode_raw(data)
        resized = tf.image.resize(tf.cast(image, tf.float32), (height, width), method="bilinear")
        return tf.ensure_shape(resized, [height, width, channels]), size

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def predict_images(image_bytes):
        images, sizes = tf.map_fn(
            decode, image_bytes,
            fn_output_signature=(tf.TensorSpec([height, width, channels], tf.float32), tf.TensorSpec([2], tf.int32)))
        probs, labels = head(images)
        sizes = tf.identity(sizes, name="image_size")
        if not task.dense:
            return {task.serving_key: tf.identity(labels, name=task.serving_key),
                    "probabilities": tf.identity(probs, name="probabilities"), "image_size": sizes}
        # Interpolate the probabilities (not the labels) back to each image's size, then decide.
        max_hw = tf.reduce_max(tf.concat([sizes, tf.zeros([1, 2], tf.int32)], axis=0), axis=0)

        def at_original_size(args):
            p, size = args
            lab = task.labels(tf.image.resize(p, size, method="bilinear"))
            pad = tf.stack([[0, max_hw[0] - size[0]], [0, max_hw[1] - size[1]]])
            return tf.pad(lab, pad, constant_values=LABEL_PAD)

        # One image at a time: an image's full-size probabilities can be large.
        label_map = tf.map_fn(at_original_size, (probs, sizes), parallel_iterations=1,
                              fn_output_signature=tf.TensorSpec([None, None], tf.int32))
        return {"label_map": tf.identity(label_map, name="label_map"),
                "probabilities": tf.identity(probs, name="probabilities"), "image_size": sizes}

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def label_images(image_bytes):
        # predict_images without the probabilities: REST has no output filter, and JSON for
        # per-pixel probabilities costs more than the network on a CPU.
        out = predict_images(image_bytes)
        return {k: v for k, v in out.items() if k != "probabilities"}

    num_outputs = int(model.outputs[index].shape[-1])
    # Fewer names than outputs (a run on a subset of the classes): the rest are named by index.
    names = list(meta.get("class_names") or [])[:num_outputs]
    names += [str(i) for i in range(len(names), num_outputs)]
    def outputs(images):
        out = model(pre.apply(images), training=False)
        return list(out) if isinstance(out, (list, tuple)) else [out]

    serving = Serving(
        decode=decode_raw, probabilities=lambda images: head(images)[0], network_size=(height, width),
        channels=channels, class_names=tuple(names), outputs=outputs, head=head_,
        any_size=not all(input_hw), eval_transform=tuple(eval_transform) if eval_transform else None,
        postprocess=_postprocess(model))
    # The task's own serving_default / predict_images (detection), else the probability ones.
    core = task.core_signatures(serving) or {"serving_default": serve, "predict_images": predict_images,
                                             "label_images": label_images}
    task_signatures = task.image_signatures(serving)

    # What the graph applies is what the model expects: a preprocessing= override is recorded.
    meta["preprocessing"] = pre.to_dict()
    module = tf.Module()
    module.kseg_weights = {v.path: v.value for v in model.weights}
    module.kseg_signatures = {**core, "raw_outputs": serving_function(model), **task_signatures}
    meta["serving"] = {
        "task": task.name,
        "image_size": [height, width],
        "channels": channels,
        "output_index": index,
        "activation": activation,
        "label_padding": LABEL_PAD,
        "max_image_pixels": int(max_image_pixels),
        "signatures": list(module.kseg_signatures),
    }
    if eval_transform:
        meta["serving"]["eval_transform"] = list(eval_transform)
    return module, meta


def _postprocess(model):
    """A detector's decoder as f(raw outputs list, images): it reads the outputs it names (and the
    input's size from the images); None for other models."""
    decoder = md.postprocess_of(model)
    if decoder is None:
        return None
    names = list(model.output_names)

    def postprocess(raw, images):
        named = dict(zip(names, raw))
        return decoder([images if n == "image" else named[n] for n in decoder.inputs_from])

    return postprocess


def export(model, path, *, version=None, image_size=None, preprocessing=None, class_names=None, force=False,
           verify=True, max_image_pixels=MAX_IMAGE_PIXELS, progress=False, eval_transform=None) -> str:
    """Export a Keras model to TF Serving's layout: `path` is BASE/NAME; returns BASE/NAME/VERSION.

    version: the version directory (default: one more than the highest present, 1 if none).
    image_size: (height, width) predict_images resizes to (default: the model's fixed input
    size, else the registry's default input size). preprocessing: override the registry's
    (a kind such as "caffe", a model name, or a kseg.Preprocessing); needed only for models
    without kseg metadata. The version directory is written next to its destination,
    verified against the Keras model (verify=True), and renamed into place in one step, so
    a server polling BASE/NAME never sees a half-written version. progress=True shows the
    current step on standard error. eval_transform: a classifier's (resize_shorter, crop,
    interpolation) for classify_images (default: the shorter side to crop / 0.875, bilinear).
    """
    with stages(progress, f"exporting {model.name}") as stage:
        stage("tracing the signatures")
        module, meta = build_module(model, image_size=image_size, preprocessing=preprocessing,
                                    class_names=class_names, max_image_pixels=max_image_pixels,
                                    eval_transform=eval_transform)
        out = serving_version_dir(path, version)
        with atomic_output(out, force=force) as tmp:
            stage(f"writing {out}")
            write_module(module, meta, tmp)
            if verify:
                stage("verifying against the Keras model")
                verify_export(tmp, model, meta, module=module)
    return out


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


def serving_size(model, image_size=None, eval_transform=None, min_size=None, max_size=None):
    """(image_size, eval_transform) build_module / export take for `model`, as `kseg export --serving` and
    `kseg convert --to tf_serving` choose them.

    An any-size detector gets its test scale (detector_scale: min_size, max_size, default its layout's)
    as eval_transform (min_size, max_size, "bilinear"), which its signatures resize each image to, and
    image_size (min_size, min_size), the size its export is verified at; an image_size of its own has
    no meaning (the images keep their aspect ratio) and is refused. Any other model keeps image_size and
    eval_transform as given and refuses min_size / max_size.
    """
    scale = detector_scale(model, min_size, max_size)
    if scale is None:
        return image_size, eval_transform
    if image_size is not None:
        raise ValueError(f"{model.name} takes images of any size: its export resizes each image keeping the aspect "
                         f"ratio to its test scale (shorter side {scale[0]}, longer at most {scale[1]}; "
                         "min_size / max_size, --min-size / --max-size, change it), not to image_size "
                         "(--image-size, or --static --input-size in kseg convert)")
    return (scale[0], scale[0]), (*scale, "bilinear")


def save_format(model, path, *, metadata=None, input_size=None, min_size=None, max_size=None, **_):
    """kseg.serving's export: image-level signatures (preprocessing in the graph) + raw_outputs.

    input_size: the size predict_images resizes to (`kseg convert --static --input-size`). An any-size
    detector is exported at its test scale instead (serving_size; min_size / max_size change it), as
    `kseg export --serving` exports it. A model with no servable head (a classifier without its top, a
    plain Keras model whose preprocessing is unknown) or with inputs besides the image (Fast R-CNN's
    proposals: the image-level signatures have no place for them) gets the plain SavedModel's
    serving_default, with a warning.
    """
    if len(model.inputs) > 1:  # build_module refuses it below: the plain SavedModel, where a scale means nothing
        if min_size is not None or max_size is not None:
            raise ValueError(f"{model.name} takes inputs {[t.name for t in model.inputs]}: its tf_serving export is a "
                             "plain SavedModel that resizes nothing, so min_size / max_size (--min-size / "
                             "--max-size) have no meaning for it")
        eval_transform = None
    else:
        input_size, eval_transform = serving_size(model, input_size, None, min_size, max_size)
    try:
        module, meta = build_module(model, image_size=input_size, class_names=(metadata or {}).get("class_names"),
                                    eval_transform=eval_transform)
    except ValueError as e:
        warnings.warn(f"{path}: {e}; writing serving_default with the model's own outputs only", stacklevel=2)
        saved_model_format.save(model, path, metadata=metadata, input_size=input_size)
        return
    write_module(module, meta, path)
    verify_export(path, model, meta, module=module)


def write_module(module, meta, directory):
    """Save build_module's module with its signatures and the metadata to `directory`."""
    import tensorflow as tf

    tf.saved_model.save(module, directory, signatures=dict(module.kseg_signatures))
    md.write_saved_model(directory, meta)


def encode_png(image) -> bytes:
    """PNG bytes of an HxWxC (C = 1 or 3) uint8 array."""
    import numpy as np
    from PIL import Image

    array = np.asarray(image, dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array).save(buffer, format="PNG")
    return buffer.getvalue()


def reference_outputs(model, meta, images):
    """In-process `serving_default` outputs of the Keras model for an RGB 0..255 float batch."""
    import numpy as np

    serving = meta["serving"]
    pre = md.of_metadata(meta).preprocessing
    x = pre.apply(np.asarray(images, np.float32)) if pre else np.asarray(images, np.float32)
    out = model(x, training=False)
    out = np.asarray(out[serving["output_index"]] if isinstance(out, (list, tuple)) else out)
    act = serving["activation"]
    if act in ("softmax", "softmax_negated"):
        z = -out if act == "softmax_negated" else out
        z = np.exp(z - z.max(axis=-1, keepdims=True))
        probs = z / z.sum(axis=-1, keepdims=True)
    elif act == "sigmoid":
        probs = 1 / (1 + np.exp(-out))
    else:
        probs = out
    return probs


def verify_export(directory, model, meta, seed=0, module=None):
    """Load the export and check serving_default and predict_images against the Keras model (a
    task's own signatures, e.g. detection's: against the module's functions before saving)."""
    import numpy as np
    import tensorflow as tf

    loaded = tf.saved_model.load(directory)
    missing = [s for s in meta["serving"]["signatures"] if s not in loaded.signatures]
    if missing:
        raise ExportVerificationError(f"{directory}: signatures {missing} missing after export")
    h, w = meta["serving"]["image_size"]
    c = meta["serving"]["channels"]
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(2, h, w, c)).astype(np.float32)
    if "probabilities" not in loaded.signatures["serving_default"].structured_outputs:
        return _verify_task_signatures(directory, loaded, module, images)
    expected = reference_outputs(model, meta, images)
    got = loaded.signatures["serving_default"](images=tf.constant(images))["probabilities"].numpy()
    err = float(np.max(np.abs(got - expected)))
    if not err <= 1e-4:
        raise ExportVerificationError(f"{directory}: serving_default probabilities differ from the Keras model "
                                      f"by {err:.3g} (allowed 1e-4); nothing was written")
    # The PNG path decodes the same pixels and, at the network size, resizes by an identity.
    data = tf.constant([encode_png(images[0]), encode_png(images[1])])
    out = loaded.signatures["predict_images"](image_bytes=data)
    err = float(np.max(np.abs(out["probabilities"].numpy() - expected)))
    if not err <= 1e-4:
        raise ExportVerificationError(f"{directory}: predict_images probabilities differ from the Keras model "
                                      f"by {err:.3g} (allowed 1e-4); nothing was written")
    for name in meta["serving"]["signatures"]:
        if name not in SIGNATURES:  # the task's own: they run on encoded images and give finite numbers
            for key, value in loaded.signatures[name](image_bytes=data).items():
                if value.dtype.is_floating and not np.all(np.isfinite(value.numpy())):
                    raise ExportVerificationError(f"{directory}: {name} returned non-finite {key}; nothing was written")
    if get_task(meta["serving"]["task"]).dense:
        sizes = out["image_size"].numpy().tolist()
        if sizes != [[h, w], [h, w]] or tuple(out["label_map"].shape) != (2, h, w):
            raise ExportVerificationError(f"{directory}: predict_images returned label maps of shape "
                                          f"{tuple(out['label_map'].shape)} for two {h}x{w} images")


def _verify_task_signatures(directory, loaded, module, images):
    """A task's own serving_default and predict_images after saving and loading equal the same
    functions run before saving (detections: equal counts and classes, boxes and scores within 1e-4)."""
    import numpy as np
    import tensorflow as tf

    data = tf.constant([encode_png(images[0]), encode_png(images[1])])
    for name, arg in (("serving_default", {"images": tf.constant(images)}), ("predict_images", {"image_bytes": data})):
        got = {k: v.numpy() for k, v in loaded.signatures[name](**arg).items()}
        want = {k: v.numpy() for k, v in module.kseg_signatures[name](**arg).items()}
        for key, value in want.items():
            same = (np.array_equal(got[key], value) if not np.issubdtype(value.dtype, np.floating)
                    else got[key].shape == value.shape and np.allclose(got[key], value, rtol=0, atol=1e-4))
            if not same:
                raise ExportVerificationError(f"{directory}: {name} {key} differs after saving; nothing was written")


def resolve_model(source, *, model=None, build_kwargs=None, weights=None, unsafe=False):
    """A Keras model from a file (any format `kseg convert` reads) or a registry name (built fresh)."""
    source = os.fspath(source)
    if os.path.exists(source) or os.path.exists(source + ".index"):
        keras_model = load_keras(source, model=model, build_kwargs=build_kwargs, unsafe=unsafe)
        if model is not None and md.model_info(keras_model) is None:
            keras_model = as_kseg_model(keras_model, model, build_kwargs, source)
        return keras_model
    if source in list_models():
        return build_model(source, weights=weights, **(build_kwargs or {}))
    raise FileNotFoundError(f"{source}: neither a model file nor a registered model name "
                            f"(`kseg models` lists {len(list_models())})")
