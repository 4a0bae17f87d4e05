"""Post-training quantization: calibrators and ``calibrate``.

    qmodel = compress.quant.prepare(model, target="tensorrt")
    compress.ptq.calibrate(qmodel, calib_loader, method="entropy", limit=512)
    table = compress.ptq.sensitivity(qmodel, val_loader, "top1")      # per-layer drop / recovery
    result = compress.ptq.fallback(qmodel, val_loader, max_drop=0.3)  # most sensitive layers kept float
"""

from compress.ptq.calibrate import Calibration, calibrate, to_method
from compress.ptq.calibrators import HistogramCalibrator, MaxCalibrator, Method
from compress.ptq.fallback import Fallback, Step, fallback
from compress.ptq.sensitivity import Sensitivity, UnitSensitivity, planned_passes, sensitivity
from compress.ptq.table import LayerCalibration

__all__ = [
    "Calibration",
    "Fallback",
    "HistogramCalibrator",
    "LayerCalibration",
    "MaxCalibrator",
    "Method",
    "Sensitivity",
    "Step",
    "UnitSensitivity",
    "calibrate",
    "fallback",
    "planned_passes",
    "sensitivity",
    "to_method",
]
