"""kseg.inference: run trained models: one Predictor, evaluation, prediction on files, CRF search.

    from kseg.inference import evaluate, load_inference_model, predict_images, predictor
    m = load_inference_model("runs/dl/best.keras")            # network + its preprocessing
    predict_images(m, ["photos/"], "out", crf=True)            # palette PNGs and overlays
    scores = evaluate(m.model, kseg.data.voc(root, "val", batch_size=1), preprocessing=m.preprocessing)

kseg.inference imports kseg.data, kseg.models, kseg.tasks and kseg.registry; never kseg.train
or kseg.serving.
"""

from kseg import _lazy

# Each public name loads its module (and TensorFlow) on first use; `import kseg.inference` alone is free.
_EXPORTS = {
    "crf_search": "kseg.inference.scoring",
    "evaluate": "kseg.inference.scoring",
    "raw_pairs": "kseg.inference.scoring",
    "InferenceModel": "kseg.inference.loading",
    "load_inference_model": "kseg.inference.loading",
    "main_output": "kseg.inference.loading",
    "classify_images": "kseg.inference.files",
    "detect_images": "kseg.inference.files",
    "score_detections": "kseg.inference.scoring",
    "list_images": "kseg.inference.files",
    "plot_confusion": "kseg.inference.plots",
    "predict_edges": "kseg.inference.files",
    "predict_images": "kseg.inference.files",
    "read_image": "kseg.inference.files",
    "Predictor": "kseg.inference.traced",
    "predict": "kseg.inference.traced",
    "predictor": "kseg.inference.traced",
}
__getattr__, __dir__ = _lazy.exports(__name__, _EXPORTS)

__all__ = list(_EXPORTS)
