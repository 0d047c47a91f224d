"""kseg.train: losses, metrics, strategies, recipes and small helpers for plain model.fit.

    import kseg, kseg.train
    model = kseg.build_model("deeplab_largefov", num_classes=21)
    model.compile(optimizer="adam", loss=kseg.train.SparseCrossEntropy(),      # 255 ignored
                  metrics=[kseg.train.ConfusionMatrixMetric(21)])              # mean_iou, ...
    model.fit(kseg.data.voc(root, "train", augment=True, batch_size=8), epochs=...)

kseg.train imports kseg.models (through build_model), kseg.data and kseg.registry; only the
CLI imports kseg.train.
"""

from kseg.train.fit import (
    TrainingSetupError,
    callbacks,
    check_setup,
    compile_segmentation,
    datasets,
    evaluate,
    learning_rate,
    make_optimizer,
    train,
)
from kseg.train.losses import (
    BalancedSigmoidCrossEntropy,
    SparseCrossEntropy,
    SparseFocalLoss,
    hed_losses,
    resize_labels_nearest,
    stride8_model,
)
from kseg.train.metrics import (
    ConfusionMatrixMetric,
    confusion_matrix,
    edge_ods_ois,
    iou_table,
    scores_from_confusion,
)
from kseg.train.optim import FusedSGD
from kseg.train.recipes import Recipe, RecipeError, apply_overrides, list_recipes, load_recipe
from kseg.train.strategy import float32_outputs, multi_worker_fit, set_precision, strategy

__all__ = [
    "BalancedSigmoidCrossEntropy", "ConfusionMatrixMetric", "FusedSGD", "Recipe", "RecipeError", "SparseCrossEntropy",
    "SparseFocalLoss", "TrainingSetupError", "apply_overrides", "callbacks", "check_setup",
    "compile_segmentation", "confusion_matrix", "datasets", "edge_ods_ois", "evaluate", "float32_outputs",
    "hed_losses", "iou_table", "learning_rate", "list_recipes", "load_recipe", "make_optimizer", "multi_worker_fit",
    "resize_labels_nearest", "scores_from_confusion", "set_precision", "stride8_model", "strategy", "train",
]
