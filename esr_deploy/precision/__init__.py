"""Precision passes on ONNX: float16 (:mod:`.fp16`) and explicit Q/DQ int8 (:mod:`.int8`),
calibrated on real LR images (:mod:`.calibration`)."""
