"""kseg's conversion package: every format to every format it can reach, each path verified.

Weight import for kseg.build_model lives in kseg.weights; the format-to-format converters
(SavedModel, frozen GraphDef, checkpoints, ONNX, TFLite) land here.
"""
