"""Quantization-aware training: fine-tune a quantized model with the shared loop.

    qmodel = compress.quant.prepare(model, target="tensorrt")
    compress.ptq.calibrate(qmodel, calib_loader)
    compress.finetune(qmodel, train_loader, config, callbacks=[compress.qat.QatCallback(freeze_bn_after=2)])
"""

from compress.qat.callback import QatCallback

__all__ = ["QatCallback"]
