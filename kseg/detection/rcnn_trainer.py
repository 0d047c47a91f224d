"""Training a two-stage detector through `model.fit`: approximate joint training (Ren et al.,
"Faster R-CNN", NIPS 2015, section 3.2: the RPN and the Fast R-CNN head trained at once, the
proposals treated as fixed inputs of the head), as torchvision's GeneralizedRCNN and
py-faster-rcnn's `faster_rcnn_end2end` train it.

`RCNNTrainer(detector)` wraps a kseg detector built with raw outputs (faster_rcnn_* or
fast_rcnn_vgg16) and shares its layers. Its train_step, per batch of images and padded ground
truth {"boxes" (B, M, 4) xyxy pixels, "classes" (B, M), -1 padding}:

1. the backbone and RPN (training mode), the anchors of the feature map's grid;
2. RPN targets (rcnn_targets.anchor_labels), 256 anchors sampled per image at most half positive,
   the objectness and box losses;
3. proposals with the training counts (py-faster-rcnn: 12000 before / 2000 after NMS), no gradient;
4. RoIs sampled from the proposals with the GT boxes appended (128 per image, 25% foreground);
5. the RoI op and the head on those RoIs, the classification and box losses.

Fast R-CNN (a detector whose proposals are an input) skips 1-3 and samples from the given proposals.
The four losses are summed with weight 1 each (torchvision; the paper's lambda = 10 with
N_reg ~ 2400 balances the same terms) and reported one by one. test_step computes the same losses
without dropout, so `val_loss` is comparable. `save` writes the wrapped detector, so checkpoints are
ordinary kseg detectors.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from kseg.detection import rcnn_targets as rt
from kseg.detection.proposals import ProposalLayer, grid_anchors

LOSS_NAMES = ("rpn_objectness_loss", "rpn_box_loss", "classifier_loss", "box_loss")
# py-faster-rcnn's TRAIN config (lib/fast_rcnn/config.py) and torchvision's FasterRCNN defaults.
SETTINGS = {
    "pyfaster": dict(rpn_batch=256, rpn_fg_fraction=0.5, rpn_fg_iou=0.7, rpn_bg_iou=0.3, allowed_border=0.0,
                     pre_nms_top_n=12000, post_nms_top_n=2000, roi_batch=128, roi_fg_fraction=0.25, fg_iou=0.5,
                     bg_iou=(0.1, 0.5), rpn_beta=1.0 / 9, head_beta=1.0),
    "torchvision": dict(rpn_batch=256, rpn_fg_fraction=0.5, rpn_fg_iou=0.7, rpn_bg_iou=0.3, allowed_border=None,
                        pre_nms_top_n=2000, post_nms_top_n=2000, roi_batch=512, roi_fg_fraction=0.25, fg_iou=0.5,
                        bg_iou=(0.0, 0.5), rpn_beta=1.0 / 9, head_beta=1.0 / 9),
}


def _layer(model, names):
    for name in names:
        try:
            return model.get_layer(name)
        except ValueError:
            continue
    return None


@keras.saving.register_keras_serializable(package="kseg")
class RCNNTrainer(keras.Model):
    """Approximate joint training of `detector` (see the module docstring); `settings` overrides
    SETTINGS[convention] one by one ("pyfaster" for the paper's layout, "torchvision")."""

    def __init__(self, detector, convention="pyfaster", seed=0, **settings):
        super().__init__(name=f"{detector.name}_trainer")
        if convention not in SETTINGS:
            raise ValueError(f"convention must be one of {list(SETTINGS)}, got {convention!r}")
        unknown = set(settings) - set(SETTINGS[convention])
        if unknown:
            raise ValueError(f"unknown training settings {sorted(unknown)}; known: {sorted(SETTINGS[convention])}")
        self.detector = detector
        self.convention = convention
        self.settings = {**SETTINGS[convention], **settings}
        self.seed = int(seed)
        self.seed_generator = keras.random.SeedGenerator(self.seed)
        roi_op = _layer(detector, ("roi_pool5", "roi_align5"))
        rois = _layer(detector, ("rois",))
        if roi_op is None or rois is None:
            raise ValueError(f"{detector.name} has no RoI op layer (roi_pool5 / roi_align5) and `rois` layer: "
                             "RCNNTrainer trains kseg's R-CNN-family detectors built with postprocess=False")
        features = roi_op.input[0]
        flat = [detector.get_layer(n).input for n in ("class_logits", "box_regression")]
        # The head from the shared feature map and sampled RoIs (B*S, 5) to the flat class logits and deltas.
        self.head = keras.Model([features, rois.output], flat, name="rcnn_head")
        proposal_layer = _layer(detector, ("proposal_layer",))
        self.has_rpn = proposal_layer is not None
        if self.has_rpn:
            objectness, _, _, _ = proposal_layer.input
            self.backbone = keras.Model(detector.inputs, [
                features, detector.get_layer("rpn_objectness").output, objectness,
                detector.get_layer("rpn_deltas").output], name="rcnn_backbone")
            config = proposal_layer.get_config()
            config.update(name="train_proposals", pre_nms_top_n=self.settings["pre_nms_top_n"],
                          post_nms_top_n=self.settings["post_nms_top_n"])
            self.cell_anchors = config["cell_anchors"]
            self.train_proposals = ProposalLayer.from_config(config)
        else:
            image = detector.get_layer("image").output
            self.backbone = keras.Model(image, features, name="rcnn_backbone")
        self.trackers = {n: keras.metrics.Mean(name=n) for n in ("loss",) + LOSS_NAMES}
        self.built = True  # its variables are the (built) detector's

    @property
    def metrics(self):
        return list(self.trackers.values())

    def call(self, inputs, training=False):
        return self.detector(inputs, training=training)

    def losses_of(self, x, y, training):
        """The four losses (a dict) of one batch: x the detector's input(s), y {"boxes", "classes"}."""
        s = self.settings
        gt_boxes, gt_classes = tf.cast(y["boxes"], tf.float32), tf.cast(y["classes"], tf.int32)
        out = {}
        if self.has_rpn:
            image = x
            features, raw_objectness, objectness, deltas = self.backbone(image, training=training)
            image_hw = tf.shape(image)[1:3]
            anchors = grid_anchors(self.cell_anchors, tf.shape(features)[1:3], image_hw)
            labels, matched = rt.anchor_labels(anchors, gt_boxes, gt_classes, image_hw, fg_iou=s["rpn_fg_iou"],
                                               bg_iou=s["rpn_bg_iou"], allowed_border=s["allowed_border"])
            positive, negative = rt.sample(labels, s["rpn_batch"], s["rpn_fg_fraction"], self.seed_generator)
            out["rpn_objectness_loss"], out["rpn_box_loss"] = rt.rpn_losses(
                raw_objectness, deltas, anchors, labels, matched, positive, negative, beta=s["rpn_beta"])
            proposals, mask = self.train_proposals([objectness, deltas, features, image])
        else:
            image, proposals = x["image"], x["proposals"]
            features = self.backbone(image, training=training)
            proposals = tf.cast(proposals, tf.float32)
            mask = (proposals[..., 2] > proposals[..., 0]) & (proposals[..., 3] > proposals[..., 1])
            out["rpn_objectness_loss"] = out["rpn_box_loss"] = tf.constant(0.0)
        rois, labels, targets, valid = rt.roi_targets(
            proposals, mask, gt_boxes, gt_classes, self.seed_generator, batch_size=s["roi_batch"],
            fg_fraction=s["roi_fg_fraction"], fg_iou=s["fg_iou"], bg_iou=tuple(s["bg_iou"]))
        batch, rows = tf.shape(rois)[0], tf.shape(rois)[1]
        index = tf.cast(tf.repeat(tf.range(batch), rows), tf.float32)
        flat_rois = tf.concat([index[:, None], tf.reshape(rois, [-1, 4])], axis=1)
        # Only the sampled RoIs go through the head, as torchvision's and py-faster-rcnn's samplers
        # return them: where fewer than roi_batch could be sampled (few proposals, as from an
        # untrained RPN), the padding rows would cost the head's full work for nothing.
        keep = tf.where(tf.reshape(valid, [-1]))[:, 0]
        logits, box_regression = self.head([features, tf.gather(flat_rois, keep)], training=training)
        labels, targets = tf.gather(tf.reshape(labels, [-1]), keep), tf.gather(tf.reshape(targets, [-1, 4]), keep)
        out["classifier_loss"], out["box_loss"] = rt.head_losses(
            logits, box_regression, labels, targets, tf.ones_like(labels, tf.bool), beta=s["head_beta"])
        return out

    def _report(self, parts, total):
        self.trackers["loss"].update_state(total)
        for name in LOSS_NAMES:
            self.trackers[name].update_state(parts[name])
        return {name: tracker.result() for name, tracker in self.trackers.items()}

    def train_step(self, data):
        x, y = data[0], data[1]
        with tf.GradientTape() as tape:
            parts = self.losses_of(x, y, training=True)
            total = tf.add_n([parts[n] for n in LOSS_NAMES])
            # MirroredStrategy sums the replicas' gradients: each replica's share of the mean.
            scaled = total / tf.distribute.get_strategy().num_replicas_in_sync
        variables = self.trainable_variables
        grads = tape.gradient(scaled, variables)
        self.optimizer.apply(grads, variables)
        return self._report(parts, total)

    def test_step(self, data):
        parts = self.losses_of(data[0], data[1], training=False)
        return self._report(parts, tf.add_n([parts[n] for n in LOSS_NAMES]))

    def save(self, filepath, *args, **kwargs):
        """Save the wrapped detector (a checkpoint of the trainer is a detector file)."""
        return self.detector.save(filepath, *args, **kwargs)

    def get_config(self):
        return {"detector": keras.saving.serialize_keras_object(self.detector), "convention": self.convention,
                "seed": self.seed, **self.settings}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        detector = keras.saving.deserialize_keras_object(config.pop("detector"))
        return cls(detector, **config)
