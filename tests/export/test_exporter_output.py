"""The exporter's own prints (C++ included) never reach the terminal; its failures are one line naming the op."""

from __future__ import annotations

import pytest
import torch
from helpers_unexportable import triu_digits

from compress.errors import CompressError
from compress.export.onnx import export_onnx


def test_an_unsupported_op_is_one_line_naming_it_and_its_opset_with_nothing_printed(tmp_path, capfd) -> None:
    with pytest.raises(CompressError) as caught:
        export_onnx(triu_digits(), torch.randn(2, 64), tmp_path / "m.onnx", opset=13)
    message = str(caught.value)
    assert message == ("ONNX export failed: aten::triu has no ONNX export at opset 13; the exporter has it from "
                       "opset 14: set the opset to 14 (recipe: onnx.opset) or replace aten::triu in the model")
    out, err = capfd.readouterr()  # file descriptors 1 and 2: the TorchScript IR dump is written there from C++
    assert out == "" and err == ""
    assert not (tmp_path / "m.onnx").exists()


def test_the_same_model_exports_at_the_opset_it_names(tmp_path, capfd) -> None:
    info = export_onnx(triu_digits(), torch.randn(2, 64), tmp_path / "m.onnx", opset=14)
    assert info.opset == 14
    assert capfd.readouterr() == ("", "")


def test_an_op_with_no_export_at_any_opset_says_so(tmp_path) -> None:
    class Eig(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            m = x.reshape(-1, 8, 8)
            return torch.linalg.eigvalsh(m @ m.transpose(1, 2))

    with pytest.raises(CompressError, match=r"aten::linalg_eigvalsh has no ONNX export at opset 13 \(nor at any opset"):
        export_onnx(Eig(), torch.randn(2, 64), tmp_path / "m.onnx", opset=13)
