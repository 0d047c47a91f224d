"""Object detection: boxes, classes and scores per image from a detector's raw outputs.

A detector's Keras model returns its raw, fixed-shape training outputs (SSD: `mbox_loc`
(N, anchors, 4) box deltas and `mbox_conf` (N, anchors, classes) logits, class 0 background);
its decoder (kseg.detection) turns them into padded detections: `detection_boxes` (N, K, 4)
xyxy pixels of the network input, `detection_scores`, `detection_classes` (model class ids,
background excluded, -1 padding) and `num_detections`.

Exports follow the TF Object Detection API's serving outputs, so its clients work unchanged:
boxes normalised [ymin, xmin, ymax, xmax], classes 1-based as float32, num_detections float32
(tensorflow/models research/object_detection/exporter_lib_v2.py).
"""

from __future__ import annotations

from kseg.tasks.base import Head, Task


class Detection(Task):
    name = "detection"
    description = "boxes, classes and scores per image (VOC mAP, COCO AP)"
    dense = False
    serving_key = "detection_classes"
    target_kind = "boxes"
    data_layouts = ()
    checkpoint_metric = "loss"
    checkpoint_mode = "min"

    def head(self, output_names, build_kwargs=None, output_rank=None) -> Head:
        # The class scores: mbox_conf (softmax over classes, background first).
        names = list(output_names)
        return Head(names.index("mbox_conf") if "mbox_conf" in names else len(names) - 1, "softmax")

    def core_signatures(self, serving):
        """serving_default (float RGB 0..255 batch at the network size) and predict_images (encoded
        images, any size, each resized to the network input as torchvision's SSD transform does)
        with the Object Detection API's outputs; predict_images adds `image_size`."""
        import tensorflow as tf

        if serving.postprocess is None:
            raise ValueError("this detector has no decoder to export (its registry spec names none)")
        h, w = serving.network_size
        c = serving.channels

        def detect(images):
            found = serving.postprocess(serving.outputs(images))
            return od_api_outputs(found, (h, w))

        @tf.function(input_signature=[tf.TensorSpec([None, h, w, c], tf.float32, name="images")])
        def serving_default(images):
            return detect(images)

        def decode(data):
            image, size = serving.decode(data)
            resized = tf.image.resize(tf.cast(image, tf.float32), (h, w), method="bilinear")
            return tf.ensure_shape(resized, [h, w, c]), size

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
        def predict_images(image_bytes):
            images, sizes = tf.map_fn(decode, image_bytes, fn_output_signature=(
                tf.TensorSpec([h, w, c], tf.float32), tf.TensorSpec([2], tf.int32)))
            # Boxes are normalised: the same numbers for the original image (the resize is per axis).
            return {**detect(images), "image_size": tf.identity(sizes, name="image_size")}

        return {"serving_default": serving_default, "predict_images": predict_images}


def od_api_outputs(found, network_size):
    """Decoder outputs (xyxy pixels of the network input, model class ids, -1 padding) -> the Object
    Detection API's: normalised [ymin, xmin, ymax, xmax], 1-based classes and counts as float32."""
    import tensorflow as tf

    h, w = (float(v) for v in network_size)
    x1, y1, x2, y2 = tf.unstack(tf.cast(found["detection_boxes"], tf.float32), axis=-1)
    boxes = tf.stack([y1 / h, x1 / w, y2 / h, x2 / w], axis=-1)
    classes = tf.cast(tf.maximum(found["detection_classes"], 0), tf.float32)  # padding: 0, score 0
    return {"detection_boxes": tf.identity(boxes, name="detection_boxes"),
            "detection_scores": tf.identity(tf.cast(found["detection_scores"], tf.float32), name="detection_scores"),
            "detection_classes": tf.identity(classes, name="detection_classes"),
            "num_detections": tf.identity(tf.cast(found["num_detections"], tf.float32), name="num_detections")}


DETECTION = Detection()
