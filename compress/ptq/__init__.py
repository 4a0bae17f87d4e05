"""Post-training quantization: calibrators and ``calibrate``.

    qmodel = compress.quant.prepare(model, target="tensorrt")
    compress.ptq.calibrate(qmodel, calib_loader, method="entropy", limit=512)
"""

from compress.ptq.calibrate import Calibration, calibrate, to_method
from compress.ptq.calibrators import HistogramCalibrator, MaxCalibrator, Method
from compress.ptq.table import LayerCalibration

__all__ = ["Calibration", "HistogramCalibrator", "LayerCalibration", "MaxCalibrator", "Method", "calibrate", "to_method"]
