"""Object detection's shared operations: boxes and the box coder, prior boxes and RPN anchors
(anchors), matching, export-safe NMS, the decoder layer that turns raw SSD outputs into padded
detections, RoI pooling (roi) and the comparison of two runs' detections as sets (compare).

Conventions: boxes are xyxy, float32, absolute pixels of the network input, without Caffe's
+1 widths (torchvision's); class 0 is background in model outputs.
"""
