"""kseg.train: losses, metrics, strategies, recipes and small helpers for plain model.fit.

    import kseg, kseg.train
    model = kseg.build_model("deeplab_largefov", num_classes=21)
    model.compile(optimizer="adam", loss=kseg.train.SparseCrossEntropy(),      # 255 ignored
                  metrics=[kseg.train.ConfusionMatrixMetric(21)])              # mean_iou, ...
    model.fit(kseg.data.voc(root, "train", augment=True, batch_size=8), epochs=...)

kseg.train only trains: evaluation and prediction are kseg.inference. It imports kseg.models
(through build_model), kseg.data, kseg.tasks and kseg.registry; never kseg.inference or kseg.serving.
"""

from kseg import _lazy

# Each public name loads its module (and TensorFlow) on first use; `import kseg.train` alone is free.
_EXPORTS = {
    "TrainingSetupError": "kseg.train.fit",
    "callbacks": "kseg.train.fit",
    "check_setup": "kseg.train.fit",
    "compile_segmentation": "kseg.train.fit",
    "datasets": "kseg.train.fit",
    "learning_rate": "kseg.train.fit",
    "make_optimizer": "kseg.train.fit",
    "train": "kseg.train.fit",
    "BalancedSigmoidCrossEntropy": "kseg.tasks.losses",
    "SparseCrossEntropy": "kseg.tasks.losses",
    "SparseFocalLoss": "kseg.tasks.losses",
    "hed_losses": "kseg.tasks.losses",
    "resize_labels_nearest": "kseg.tasks.losses",
    "stride8_model": "kseg.tasks.losses",
    "ConfusionMatrixMetric": "kseg.tasks.metrics",
    "confusion_matrix": "kseg.tasks.metrics",
    "edge_ods_ois": "kseg.tasks.metrics",
    "iou_table": "kseg.tasks.metrics",
    "scores_from_confusion": "kseg.tasks.metrics",
    "FusedSGD": "kseg.train.optim",
    "Recipe": "kseg.train.recipes",
    "RecipeError": "kseg.train.recipes",
    "apply_overrides": "kseg.train.recipes",
    "list_recipes": "kseg.train.recipes",
    "load_recipe": "kseg.train.recipes",
    "float32_outputs": "kseg.train.distribute",
    "multi_worker_fit": "kseg.train.distribute",
    "set_precision": "kseg.train.distribute",
    "strategy": "kseg.train.distribute",
}
__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS)

__all__ = list(_EXPORTS)
