"""Quantization-aware training: train a calibrated quantized model, in your own loop or the shared one.

    qmodel = compress.quant.prepare(model, target="tensorrt")
    compress.ptq.calibrate(qmodel, calib_loader)
    for x, y in train_loader:      # any loop, any optimizer: weight ranges follow the weights by themselves
        loss = F.cross_entropy(qmodel(x), y); opt.zero_grad(); loss.backward(); opt.step()
    # or: compress.finetune(qmodel, train_loader, config, callbacks=[compress.qat.QatCallback(freeze_bn_after=2)])
"""

from compress.qat.callback import QatCallback

__all__ = ["QatCallback"]
