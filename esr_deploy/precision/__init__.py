"""Precision passes on ONNX: float16 (:mod:`.fp16`) and explicit Q/DQ int8 (:mod:`.int8`),
calibrated on real LR images (:mod:`.calibration`), with the int8 sensitivity search
(:mod:`.sensitivity`); :mod:`.apply` runs them for a compile.

The calibration defaults live here, free of heavy imports, so the CLI can show them.
"""

#: int8 activation threshold methods (see :mod:`.calibration`)
METHODS = ("minmax", "percentile", "entropy", "mse")
DEFAULT_METHOD = "mse"
DEFAULT_PERCENTILE = 99.999
