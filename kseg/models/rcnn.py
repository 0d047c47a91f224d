"""R-CNN with AlexNet (Girshick, Donahue, Darrell, Malik, "Rich feature hierarchies for accurate
object detection and semantic segmentation", CVPR 2014): class-agnostic region proposals, a CNN
feature per warped region, per-class linear SVMs, class-specific box regression (appendix C).

kseg builds the test-time pipeline as one Keras graph, so it evaluates, predicts, converts and serves
like kseg's other detectors: inputs `image` (B, H, W, 3) and `proposals` (B, R, 4) xyxy pixels
(padding rows x2 <= x1, as kseg's fast_rcnn_vgg16), then
1. `crops`: each proposal dilated by 16 pixels of context and warped to crop_size x crop_size
   (kseg.detection.crops, R-CNN's rcnn_im_crop "warp" mode; the paper's CaffeNet took 227, kseg's
   torchvision-layout AlexNet 224), outside the image the mean;
2. AlexNet's convs to `pool5` (6 x 6 x 256), `fc6`, `fc7` (4096, ReLU; dropout before each as
   torchvision's AlexNet, identity at test): the layer names and weights of kseg's `alexnet`, so
   `backbone_weights=` takes its ImageNet files;
3. `svm`: one linear SVM per foreground class on fc7, a Dense(C - 1) (trained with a squared hinge
   loss and hard negative mining, kseg.detection.rcnn_stages; R-CNN trained liblinear's L1-hinge
   SVMs: see there);
4. `bbox_reg`: class-specific box regression on pool5 (Dense(4 (C - 1)) on the 9216 flattened pool5
   features), ridge regression (appendix C).
Raw outputs as fast_rcnn_vgg16's, so kseg's decoder reads both: `proposals`, `proposal_mask`,
`class_logits` (B, R, C) = the SVM scores after a zero background column, `box_regression` (B, R, 4C)
= the regression after four zero background columns (deltas in the coder convention of kseg's Fast
R-CNN head: weights (10, 10, 5, 5)). `postprocess=True` appends the decoder with R-CNN's test
settings: per class, sigmoid(SVM score) (monotone in the score, so the ranking and the mAP are the
SVM's) > 0.05, box regression, greedy NMS at IoU 0.3, 100 detections per image.

Parameters for C = 21: AlexNet up to fc7 57,003,840 (kseg's alexnet less its 1000-way fc8), SVMs 4096 x
20 + 20 = 81,940, box regression 9216 x 80 + 80 = 737,360: 57,823,140. Training (three stages, one
`kseg train`): kseg.detection.rcnn_stages.
"""

from __future__ import annotations

import numbers

import keras
from keras import layers

from kseg.detection.crops import RegionCrops
from kseg.detection.precomputed import PaddedProposals
from kseg.detection.proposals import BackgroundColumns, PerImage
from kseg.models._common import check_width, model_input, scaled
from kseg.models.alexnet import CONVS, alexnet_convs
from kseg.registry import TorchMapping, register_model

PAPER = "Girshick et al., Rich feature hierarchies for accurate object detection and semantic segmentation, CVPR 2014"
NUM_PROPOSALS = 2000  # ~2000 Selective Search boxes per image (fast mode), section 2.2
CROP_SIZE = 224  # the input of kseg's torchvision-layout AlexNet (CaffeNet's was 227)
CONTEXT = 16  # pixels of warped context around each box (section 2.1, appendix A)
TEST_NMS = 0.3  # rcnn_test.m: greedy per-class NMS at 0.3 IoU
# Each image is resized as Fast R-CNN's test scale; every region is warped to crop_size anyway, so the
# scale only sets how much image detail the warp samples from.
TEST_SCALES = {"torchvision": (600, 1000)}


def _adapt_alexnet(arrays, model, path):
    """ImageNet AlexNet -> conv1 .. conv5, fc6, fc7 (its fc8 is dropped: R-CNN replaces it)."""
    from kseg.weights import copy_by_name

    return copy_by_name(arrays, [c[0] for c in CONVS] + ["fc6", "fc7"], path, "alexnet")


def torch_map():
    """A torch state_dict of the detector: torchvision AlexNet's keys for the trunk (features.N,
    classifier.1 / .4), then R-CNN's own layers, which torchvision lacks, as `svm` (Linear on fc7) and
    `bbox_reg` (Linear on pool5 flattened NCHW, as torchvision flattens)."""
    convs = [TorchMapping(f"features.{i}", c[0], "conv") for i, c in zip((0, 3, 6, 8, 10), CONVS)]
    return convs + [TorchMapping("classifier.1", "fc6", "dense_nchw", chw=(256, 6, 6)),
                    TorchMapping("classifier.4", "fc7", "dense"),
                    TorchMapping("svm", "svm", "dense"),
                    TorchMapping("bbox_reg", "bbox_reg", "dense_nchw", chw=(256, 6, 6))]


def decoder(options: dict):
    """FastRCNNDecoder with R-CNN's test settings on sigmoid(SVM scores) (module docstring)."""
    from kseg.detection.postprocess import FastRCNNDecoder

    return FastRCNNDecoder(iou_threshold=TEST_NMS, scores="sigmoid", name="rcnn_decoder")


def trainer(model, options: dict, settings: dict):
    """R-CNN's three training stages (kseg.detection.rcnn_stages.RCNNStages); `settings` from the recipe."""
    from kseg.detection.rcnn_stages import RCNNStages

    return RCNNStages(model, **settings)


def _check_int(name, value, low):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < low:
        raise ValueError(f"rcnn_alexnet: {name} must be an int >= {low}, got {value!r}")


@register_model(
    "rcnn_alexnet",
    task="detection",
    paper=PAPER,
    input_shape=(None, None, 3),
    num_classes=21,
    preprocessing="torch",
    params=57_823_140,
    torch_map=torch_map,
    backbone="alexnet",
    backbone_adapt=_adapt_alexnet,
    postprocess=decoder,
    trainer=trainer,
    test_scales=TEST_SCALES,
)
def rcnn_alexnet(*, num_classes=21, input_shape=None, num_proposals=NUM_PROPOSALS, crop_size=CROP_SIZE,
                 context=CONTEXT, dropout=0.5, postprocess=False, width=1.0):
    """R-CNN, AlexNet: inputs image and proposals, raw named outputs (module docstring).

    num_proposals: R, the proposals input's rows per image (padding rows allowed). crop_size: the warp's
    side (pool5 is 6 x 6 from 224; other sizes are pooled to 6 x 6 as torchvision's AlexNet does).
    context: pixels of context in the warped crop. width: a channel multiplier in (0, 1] for the convs
    and fc6 / fc7 (kseg's, for CPU tests). Memory: every proposal is a crop through AlexNet, about
    1.5 MB of activations each at 224: a 2000-proposal image needs about 3 GB.
    """
    _check_int("num_classes", num_classes, 2)
    _check_int("num_proposals", num_proposals, 1)
    _check_int("crop_size", crop_size, 80)  # AlexNet's pool5 needs at least 1 x 1
    _check_int("context", context, 0)
    check_width(width, "rcnn_alexnet")
    image = model_input(input_shape, (None, None, 3))
    proposals = keras.Input((int(num_proposals), 4), name="proposals")
    boxes, mask = PaddedProposals(name="proposal_input")(proposals)
    mask = layers.Identity(name="proposal_mask")(mask)
    crops = RegionCrops(int(crop_size), int(context), name="crops")([image, boxes])
    x = alexnet_convs(crops, width)
    x = layers.AdaptiveAveragePooling2D((6, 6), name="avgpool")(x)
    pool5 = layers.Flatten(name="flatten")(x)
    x = layers.Dropout(dropout, name="fc6_dropout")(pool5)
    x = layers.Dense(scaled(4096, width), activation="relu", name="fc6")(x)
    x = layers.Dropout(dropout, name="fc7_dropout")(x)
    fc7 = layers.Dense(scaled(4096, width), activation="relu", name="fc7")(x)
    foreground = int(num_classes) - 1
    # The regression zero-initialised: before its stage a detector keeps each proposal's box.
    svm = layers.Dense(foreground, name="svm")(fc7)
    regression = layers.Dense(4 * foreground, kernel_initializer="zeros", name="bbox_reg")(pool5)
    rows = int(num_proposals)
    class_logits = PerImage(rows, name="class_logits")(BackgroundColumns(1, name="svm_scores")(svm))
    box_regression = PerImage(rows, name="box_regression")(BackgroundColumns(4, name="bbox_deltas")(regression))
    raw = [proposals, mask, class_logits, box_regression]
    if not postprocess:
        return keras.Model([image, proposals], raw, name="rcnn_alexnet")
    found = decoder({})([proposals, mask, class_logits, box_regression, image])
    return keras.Model([image, proposals], found, name="rcnn_alexnet")
