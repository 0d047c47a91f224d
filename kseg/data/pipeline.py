"""The tf.data graph shared by every reader: read -> validate -> augment -> batch -> preprocess.

Readers only list files (kseg.data.readers); everything per element happens here, in
parallel maps of graph ops, so decoding and augmenting use every core without the GIL.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import threading
import warnings

import numpy as np
import tensorflow as tf

from kseg.data import augment as aug_ops
from kseg.data.decode import read_image, read_pair
from kseg.data.layouts import Source
from kseg.data.spec import LabelSpec
from kseg.identity import resolve_preprocessing
from kseg.progress import progress as progress_bar

AUTOTUNE = tf.data.AUTOTUNE
# The element functions use tf.cond explicitly and no Python control flow on tensors, so
# AutoGraph's source conversion would only add most of the pipeline's build time.
_plain = tf.autograph.experimental.do_not_convert


class SkipLog:
    """Files a reader skipped with skip_bad=True: (path, reason) in the order first seen.

    The reader warns once per file as well, so a skip is never silent.
    """

    def __init__(self):
        self._items: dict[str, str] = {}
        self._lock = threading.Lock()

    def add(self, path: str, reason: str) -> None:
        with self._lock:
            if path in self._items:
                return
            self._items[path] = reason
            count = len(self._items)
        warnings.warn(f"kseg.data: skipped bad file #{count}: {path}: {reason}", stacklevel=2)

    def __len__(self):
        return len(self._items)

    def __iter__(self):
        return iter(list(self._items.items()))

    def __contains__(self, path):
        return path in self._items

    def __repr__(self):
        return f"SkipLog({len(self)} files: {list(self._items)[:3]}{'...' if len(self) > 3 else ''})"


# === preprocessing from the registry ===

def pad_colour(preprocessing) -> tuple[float, float, float]:
    """The RGB 0..255 colour that preprocessing maps to zero (its mean), else ImageNet's mean.

    Padding with it means padded pixels reach the network as 0, as in Caffe's DeepLab.
    """
    if preprocessing is None or preprocessing.mean is None:
        return aug_ops.IMAGENET_MEAN_RGB
    mean = np.asarray(preprocessing.mean, dtype=np.float64) / preprocessing.scale
    return tuple(float(v) for v in (mean[::-1] if preprocessing.bgr else mean))


def _raw_std(preprocessing) -> tuple[float, float, float]:
    """The raw 0..255 step that preprocessing maps to 1 (its std over its scale), per RGB channel."""
    if preprocessing is None:
        return (1.0, 1.0, 1.0)
    std = np.asarray(preprocessing.std if preprocessing.std is not None else (1.0, 1.0, 1.0), np.float64)
    std = std / preprocessing.scale
    return tuple(float(v) for v in (std[::-1] if preprocessing.bgr else std))


_PREPROCESSING_FIELDS = {"kind", "mean", "std", "bgr", "scale"}


def preprocessing_affine(preprocessing, channels: int = 3):
    """The registry Preprocessing as (A, a) with apply(x) == x @ A.T + a per pixel; None if identity.

    Preprocessing.apply's BGR flip is a negative-stride slice, about 7 ms per 321x321 image
    on TF's CPU kernels (as much as decoding and augmenting); as a 3x3 matrix it folds into
    the colour jitter's matmul for free. The tests compare this with apply() for every kind.
    """
    if preprocessing is None:
        return None
    fields = {f.name for f in dataclasses.fields(preprocessing)}
    if fields != _PREPROCESSING_FIELDS:
        raise NotImplementedError(f"kseg.data.pipeline.preprocessing_affine knows Preprocessing fields "
                                  f"{sorted(_PREPROCESSING_FIELDS)}, not {sorted(fields)}: update it")
    if channels != 3 and (preprocessing.bgr or preprocessing.mean is not None):
        raise ValueError(f"preprocessing {preprocessing.kind!r} is defined for RGB; it cannot apply to "
                         f"{channels}-channel images")
    # apply(): x * scale -> [::-1] if bgr -> - mean -> / std
    perm = np.eye(channels)[::-1] if preprocessing.bgr else np.eye(channels)
    mean = np.zeros(channels) if preprocessing.mean is None else np.asarray(preprocessing.mean, np.float64)
    std = np.ones(channels) if preprocessing.std is None else np.asarray(preprocessing.std, np.float64)
    matrix = np.diag(preprocessing.scale / std) @ perm
    offset = -mean / std
    if np.array_equal(matrix, np.eye(channels)) and not offset.any():
        return None
    return matrix.astype(np.float32), offset.astype(np.float32)


# === shared steps ===

def _options(ds, deterministic):
    options = tf.data.Options()
    options.deterministic = deterministic
    # Parallelism comes from the parallel maps; ops that also fan out inside one element
    # only add thread hand-offs on a 2-core machine (tf.data performance guide).
    options.threading.max_intra_op_parallelism = 1
    # A pool of its own: by default tf.data runs on TF's inter-op pool, where it competes with
    # the training step's ops; on 2 cores that made a small model's fit step 40% slower
    # (345 vs 245 ms for the demo's DeepLab at 128x128, batch 8).
    options.threading.private_threadpool_size = os.cpu_count() or 1
    return ds.with_options(options)


def _seeds(seed):
    # One stateless seed pair per element; a new stream each epoch, the same one per seed.
    return tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)


def _assert_good(bad_path, reason):
    message = tf.strings.join(["kseg.data: ", bad_path, ": ", reason,
                               " (kseg data check finds every bad file; skip_bad=True skips them)"])
    return tf.debugging.Assert(tf.equal(reason, ""), [message])


def _recorder(log: SkipLog):
    def record(path, reason):
        log.add(path.numpy().decode("utf-8", "replace"), reason.numpy().decode("utf-8", "replace"))
        return False

    def keep(bad_path, reason):
        return tf.cond(tf.equal(reason, ""), lambda: tf.constant(True),
                       lambda: tf.py_function(record, [bad_path, reason], tf.bool))

    return keep


def _base(source: Source, shuffle: bool, seed):
    """Dataset of unread elements and the function that loads one into raw bytes."""
    if source.records:
        files = tf.data.Dataset.from_tensor_slices(source.records)
        if shuffle:
            files = files.shuffle(len(source.records), seed=seed, reshuffle_each_iteration=True)
        ds = files.interleave(tf.data.TFRecordDataset, cycle_length=min(4, len(source.records)),
                              num_parallel_calls=AUTOTUNE, deterministic=True)
        if shuffle:
            ds = ds.shuffle(1024, seed=seed, reshuffle_each_iteration=True)
        classification = source.spec.kind == "class"
        features = {
            "image": tf.io.FixedLenFeature([], tf.string),
            "image_name": tf.io.FixedLenFeature([], tf.string),
            "label": tf.io.FixedLenFeature([], tf.int64 if classification else tf.string),
            "label_name": tf.io.FixedLenFeature([], tf.string),
        }

        def load(record):
            f = tf.io.parse_single_example(record, features)
            return f["image"], f["label"], f["image_name"], f["label_name"]

        # 1-tuples, like the (image, label) path pairs, so every later stage unpacks alike
        return ds.map(_plain(lambda record: (record,))), load
    label_dtype = tf.int32 if source.spec.kind == "class" else tf.string
    ds = tf.data.Dataset.from_tensor_slices((tf.constant(source.images, tf.string),
                                             tf.constant(source.labels, label_dtype)))
    if shuffle:
        ds = ds.shuffle(len(source.images), seed=seed, reshuffle_each_iteration=True)

    def load(image_path, label):
        label_bytes = label if source.spec.kind == "class" else tf.io.read_file(label)
        label_name = tf.strings.as_string(label) if source.spec.kind == "class" else label
        return tf.io.read_file(image_path), label_bytes, image_path, label_name

    return ds, load


def _validate(ds, skip_log, par, then=lambda payload: payload):
    """Elements (payload, bad_path, reason) -> then(payload): fail naming the file, or skip and record.

    `then` runs in the same map as the check (tf.data's map_fusion would do this too, but it
    reorders an assertion after the ops it guards).
    """
    if skip_log is None:
        def checked(payload, bad_path, reason):
            with tf.control_dependencies([_assert_good(bad_path, reason)]):
                return then(tf.nest.map_structure(tf.identity, payload))

        return ds.map(_plain(checked), **par)
    keep = _recorder(skip_log)
    return ds.filter(_plain(lambda payload, bad_path, reason: keep(bad_path, reason))).map(
        _plain(lambda payload, bad_path, reason: then(payload)), **par)


def _guarded_decode(skip_bad):
    # skip_bad pipelines also catch decoder failures (kseg.data.decode._guarded, ~5 CPU-ms per image).
    return isinstance(skip_bad, SkipLog) or bool(skip_bad)


def _run(source, *, decode, post, shuffle, seed, cache, skip_bad, num_parallel_calls, deterministic,
         needs_seed):
    """read -> validate -> [cache -> shuffle] -> augment; returns (per-element dataset, skip log).

    `decode(*raw)` returns (*values, bad_path, reason); `post(*values, seed_pair)` augments.
    """
    skip_log = None
    if isinstance(skip_bad, SkipLog) or skip_bad:  # an empty SkipLog is falsy
        skip_log = skip_bad if isinstance(skip_bad, SkipLog) else SkipLog()
        for path, reason in source.problems:
            skip_log.add(path, reason)
    elif source.problems:
        shown = "\n  ".join(f"{p}: {r}" for p, r in source.problems[:10])
        more = f"\n  ... and {len(source.problems) - 10} more" if len(source.problems) > 10 else ""
        raise FileNotFoundError(f"kseg.data: {len(source.problems)} listed files are missing "
                                f"(skip_bad=True skips them):\n  {shown}{more}")
    if not source.images and not source.records:
        raise ValueError("kseg.data: the dataset lists no usable files")

    def read(raw):
        *values, bad_path, reason = decode(*load(*raw))
        return tuple(values), bad_path, reason

    cached = cache is not None and cache is not False
    ds, load = _base(source, shuffle and not cached, seed)
    seeds = _seeds(seed) if needs_seed else tf.data.Dataset.from_tensors(tf.zeros([2], tf.int64)).repeat()
    par = dict(num_parallel_calls=num_parallel_calls, deterministic=deterministic)
    if cached:
        # Cache decoded, validated pairs; augmentation (and its seeds) comes after the cache.
        ds = _validate(ds.map(_plain(lambda *raw: read(raw)), **par), skip_log, par)
        ds = ds.cache("" if cache is True else os.fspath(cache))
        if shuffle:
            # An in-memory cache hands its buffers to the shuffle buffer without copying.
            ds = ds.shuffle(len(source.images) or 1024, seed=seed, reshuffle_each_iteration=True)
        ds = tf.data.Dataset.zip((ds, seeds))
    elif skip_log is None:
        # The default path is one map (read, check, augment): every stage boundary is a
        # thread hand-off, and on a busy 2-core machine each hand-off waits for a time slice.
        def read_checked_post(raw, seed_pair):
            values, bad_path, reason = read(raw)
            with tf.control_dependencies([_assert_good(bad_path, reason)]):
                values = tf.nest.map_structure(tf.identity, values)
            return post(*values, seed_pair)

        return tf.data.Dataset.zip((ds, seeds)).map(_plain(read_checked_post), **par), skip_log
    else:
        def read_seeded(raw, seed_pair):
            values, bad_path, reason = read(raw)
            return (values, seed_pair), bad_path, reason

        ds = tf.data.Dataset.zip((ds, seeds)).map(_plain(read_seeded), **par)
        return _validate(ds, skip_log, par, then=lambda payload: post(*payload[0], payload[1])), skip_log
    return ds.map(_plain(lambda values, seed_pair: post(*values, seed_pair)), **par), skip_log


def _finish(ds, *, batch_size, drop_remainder, finish, num_parallel_calls, deterministic, skip_log,
            class_names, num_classes):
    if batch_size:
        ds = ds.batch(batch_size, drop_remainder=drop_remainder, num_parallel_calls=num_parallel_calls,
                      deterministic=deterministic)
    if finish is not None:
        ds = ds.map(_plain(finish), num_parallel_calls=num_parallel_calls, deterministic=deterministic)
    ds = _options(ds.prefetch(AUTOTUNE), deterministic)
    # Like keras.utils.image_dataset_from_directory, facts about the data ride on the dataset.
    ds.class_names = list(class_names)
    ds.num_classes = num_classes
    ds.skipped = skip_log
    return ds


# === segmentation and edges ===

def segmentation_dataset(source: Source, *, augment=None, preprocessing=None, batch_size=None, shuffle=None,
                         seed=None, cache=None, skip_bad=False, resize=None, pad_to=None,
                         drop_remainder=False, threshold=None, num_parallel_calls=AUTOTUNE,
                         deterministic=True):
    spec = source.spec
    if augment is True:
        augment = aug_ops.SegmentationAugment()
    if augment is not None and not isinstance(augment, aug_ops.SegmentationAugment):
        raise TypeError(f"augment must be None, True or a kseg.data.SegmentationAugment, got {augment!r}")
    prep = resolve_preprocessing(preprocessing)
    pad_rgb = pad_colour(prep)
    affine = preprocessing_affine(prep)
    resize = aug_ops._pair(resize, "resize")
    pad_to = aug_ops._pair(pad_to, "pad_to")
    shuffle = augment is not None if shuffle is None else shuffle
    fixed = bool(resize or pad_to or (augment is not None and augment.crop))
    if batch_size and batch_size > 1 and not fixed:
        raise ValueError("images of different sizes cannot be batched: pass augment= with a crop, "
                         "resize=(h, w) or pad_to=(h, w) (e.g. pad_to=512 for VOC), or batch_size=1")
    if threshold is not None and spec.kind != "edge":
        raise ValueError("threshold= applies to edge maps only")

    def decode(image_bytes, label_bytes, image_name, label_name):
        image, label, bad_path, reason = read_pair(image_bytes, label_bytes, image_name, label_name, spec,
                                                   guard=_guarded_decode(skip_bad))
        return image, label, image_name, bad_path, reason

    # Preprocessing rides in the jitter's matmul unless pad_to must pad raw colours after it.
    fold = augment is not None and not pad_to

    def post(image, label, name, seed_pair):
        if resize:
            image, label = aug_ops.resize_pair(image, label, resize)
        if augment is not None:
            image, label = aug_ops.augment_pair(image, label, seed_pair, augment, pad_rgb, spec.pad_value,
                                                affine if fold else None)
        if pad_to:
            image, label = aug_ops.pad_pair(image, label, pad_to, pad_rgb, spec.pad_value, name)
        image = tf.cast(image, tf.float32)
        if spec.kind == "edge":
            label = tf.cast(label, tf.float32)
            label = label / 255.0 if threshold is None else tf.cast(label >= threshold * 255.0, tf.float32)
        else:
            label = tf.cast(label, tf.int32)
        return (image if fold else aug_ops.apply_affine(image, affine)), label

    ds, skip_log = _run(source, decode=decode, post=post, shuffle=shuffle, seed=seed, cache=cache,
                        skip_bad=skip_bad, num_parallel_calls=num_parallel_calls, deterministic=deterministic,
                        needs_seed=augment is not None)
    return _finish(ds, batch_size=batch_size, drop_remainder=drop_remainder, finish=None,
                   num_parallel_calls=num_parallel_calls, deterministic=deterministic, skip_log=skip_log,
                   class_names=source.class_names, num_classes=spec.num_classes)


# === classification ===

def classification_dataset(source: Source, *, image_size, channels=3, augment=None, preprocessing=None,
                           batch_size=None, shuffle=None, seed=None, cache=None, skip_bad=False,
                           label_mode="int", drop_remainder=False, num_parallel_calls=AUTOTUNE,
                           deterministic=True, eval_transform=None, interpolation="bilinear"):
    """(image float32 [h, w, channels], label) pairs of a listed classification dataset.

    Without augment=, each image is resized to image_size, or with eval_transform=(resize_shorter,
    crop) its shorter side is resized to resize_shorter and the centre crop (an int or (h, w))
    kept: the evaluation transform of the published ImageNet accuracies (256 -> 224). The
    output size is then the crop (image_size, if given, must equal it). interpolation: a
    tf.image.resize method ("bilinear", "bicubic", "nearest", "area", "lanczos3", "lanczos5") for
    the evaluation resize and, with augment's random resized crop, the crop's resize.
    """
    if augment is True:
        augment = aug_ops.ClassificationAugment()
    if augment is not None and not isinstance(augment, aug_ops.ClassificationAugment):
        raise TypeError(f"augment must be None, True or a kseg.data.ClassificationAugment, got {augment!r}")
    prep = resolve_preprocessing(preprocessing)
    affine = preprocessing_affine(prep, channels)
    pad_rgb = pad_colour(prep)
    eval_transform = aug_ops.check_eval_transform(eval_transform, interpolation)
    if eval_transform is not None:
        if augment is not None:
            raise ValueError("eval_transform is the evaluation transform: it does not go with augment=")
        crop = eval_transform[1]
        if image_size is not None and aug_ops._pair(image_size, "image_size") != crop:
            raise ValueError(f"image_size={image_size} differs from the eval_transform crop {crop}")
        image_size = crop
    image_size = aug_ops._pair(image_size, "image_size")
    shuffle = augment is not None if shuffle is None else shuffle
    mixers = aug_ops.batch_mixers(augment, seed, pad_rgb, _raw_std(prep)) if augment is not None else []
    if mixers and not batch_size:
        raise ValueError("mixup / cutmix / cutout / erasing work on a batch: pass batch_size")
    if label_mode not in ("int", "categorical"):
        raise ValueError(f"label_mode must be 'int' or 'categorical', got {label_mode!r}")
    one_hot = label_mode == "categorical" or any(getattr(m, "mixes_labels", False) for m in mixers)
    num_classes = source.spec.num_classes

    def decode(image_bytes, label, image_name, _label_name):
        image, bad_path, reason = read_image(image_bytes, image_name, channels, guard=_guarded_decode(skip_bad))
        return image, tf.cast(label, tf.int32), bad_path, reason

    # Mixing layers work on raw 0..255 images (RandomErasing's fill colour, value range), so
    # with them preprocessing waits for the batch; otherwise it rides in the jitter's matmul.
    early = None if mixers else affine

    def post(image, label, seed_pair):
        if augment is not None:
            image = aug_ops.augment_image(image, seed_pair, augment, image_size, early, interpolation)
        else:
            image = aug_ops.apply_affine(aug_ops.eval_image(image, image_size, eval_transform, interpolation), early)
        if one_hot and not mixers:  # with mixers, labels are one-hot encoded at the batch
            label = tf.one_hot(label, num_classes)
        return tf.ensure_shape(image, [*image_size, channels]), label

    def finish(image, label):  # after mixing: the preprocessing that waited for the batch
        return aug_ops.apply_affine(image, affine), label

    ds, skip_log = _run(source, decode=decode, post=post, shuffle=shuffle, seed=seed, cache=cache,
                        skip_bad=skip_bad, num_parallel_calls=num_parallel_calls, deterministic=deterministic,
                        needs_seed=augment is not None)
    if mixers:
        ds = ds.batch(batch_size, drop_remainder=drop_remainder)
        if one_hot:  # MixUp / CutMix blend one-hot labels; Cutout alone leaves them as they are
            ds = ds.map(_plain(lambda x, y: (x, tf.one_hot(y, num_classes))))

        def mix(images, labels):
            data = {"images": images, "labels": labels}
            for layer in mixers:
                data = layer(data)
            # The layers return labels in their compute dtype; class ids stay int32.
            return data["images"], data["labels"] if one_hot else tf.cast(data["labels"], tf.int32)

        # Sequential on purpose: the Keras layers draw from a seed generator, so a parallel
        # map would hand the draws to batches in a run-dependent order.
        ds = ds.map(_plain(mix))
        batch_size = None  # already batched
    return _finish(ds, batch_size=batch_size, drop_remainder=drop_remainder, finish=finish if mixers else None,
                   num_parallel_calls=num_parallel_calls, deterministic=deterministic, skip_log=skip_log,
                   class_names=source.class_names, num_classes=num_classes)


# === TFRecord export ===

def write_tfrecord(source: Source, path, shards: int = 1, *, progress: bool = True) -> list[str]:
    """Write a listed dataset's raw file bytes to TFRecord shards plus a `.json` sidecar.

    The files are stored as they are (JPEG/PNG bytes, not decoded pixels), so the shards are
    no larger than the dataset, reading them needs no per-file open, and the same validation
    runs on read, still naming the original file. Shards are written under temporary names
    and renamed, the sidecar last, only when every example is written: an interrupted or
    failed write leaves nothing behind that reads as a dataset.
    """
    if source.problems:
        shown = "; ".join(f"{p}: {r}" for p, r in source.problems[:5])
        raise FileNotFoundError(f"write_tfrecord: {len(source.problems)} listed files are missing: {shown}")
    path = os.fspath(path)
    shards = max(1, int(shards))
    names = [path] if shards == 1 else [f"{path}-{i:05d}-of-{shards:05d}" for i in range(shards)]
    temps = [f"{n}.{os.getpid()}.tmp" for n in names]
    writers = [tf.io.TFRecordWriter(t) for t in temps]
    classification = source.spec.kind == "class"
    done = False
    try:
        with progress_bar(progress, f"writing {os.path.basename(path)}", len(source.images)) as advance:
            for i, (image, label) in enumerate(zip(source.images, source.labels)):
                writers[i % shards].write(_example(image, label, classification).SerializeToString())
                advance()
        for w in writers:
            w.close()
        for temp, name in zip(temps, names):
            os.replace(temp, name)
        done = True
    finally:
        for w in writers:
            w.close()
        if not done:
            for temp in temps:
                if os.path.exists(temp):
                    os.remove(temp)
    meta = {"format": "kseg.data tfrecord v1", "count": len(source.images), "shards": names,
            "class_names": list(source.class_names), "spec": dataclasses.asdict(source.spec)}
    with open(path + ".json.tmp", "w") as f:
        json.dump(meta, f, indent=1)
    os.replace(path + ".json.tmp", path + ".json")
    return names


def _example(image, label, classification):
    """One tf.train.Example: the image file's bytes, its label (class id or label file bytes), names."""
    with open(image, "rb") as f:
        image_bytes = f.read()
    if classification:
        label_feature = tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)]))
        label_name = str(label)
    else:
        with open(label, "rb") as f:
            label_feature = tf.train.Feature(bytes_list=tf.train.BytesList(value=[f.read()]))
        label_name = label
    return tf.train.Example(features=tf.train.Features(feature={
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image_bytes])),
        "image_name": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image.encode()])),
        "label": label_feature,
        "label_name": tf.train.Feature(bytes_list=tf.train.BytesList(value=[label_name.encode()])),
    }))


def read_tfrecord_source(path) -> Source:
    path = os.fspath(path)
    meta_path = path + ".json"
    if not os.path.exists(meta_path):
        raise FileNotFoundError(f"{meta_path}: missing; kseg.data.tfrecord reads files written by "
                                f"kseg.data.write_tfrecord, which stores the label spec there")
    with open(meta_path) as f:
        meta = json.load(f)
    spec_dict = meta["spec"]
    for key in ("lut", "colours"):
        if spec_dict.get(key) is not None:
            spec_dict[key] = tuple(tuple(v) if isinstance(v, list) else v for v in spec_dict[key])
    spec = LabelSpec(**spec_dict)
    shards = [os.path.join(os.path.dirname(path), os.path.basename(s)) for s in meta["shards"]]
    missing = [s for s in shards if not os.path.exists(s)]
    if missing:
        found = sorted(glob.glob(path + "*"))
        raise FileNotFoundError(f"TFRecord shards missing: {missing[:3]} (found: {found[:5]})")
    return Source(images=[], labels=[], spec=spec, class_names=tuple(meta["class_names"]), records=shards)
