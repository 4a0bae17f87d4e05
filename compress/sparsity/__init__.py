"""2:4 structured sparsity: magnitude masks along the input dimension, channel permutation, verification.

    sparse = compress.sparsity.apply_2to4(model, example_input=x[:1], permute=True)
    ...train as usual, with any optimizer: the model's sparse layers keep their masks themselves...
    compress.sparsity.verify_onnx("model.onnx").sparse_layers   # 2:4 after dequantization

The masks survive ``copy.deepcopy``, ``quant.prepare``, DDP and compress checkpoints (see
:mod:`compress.sparsity.enforce`); ``compress.save``/``load`` refuse weights that break them.
"""

from compress.sparsity.eligible import LayerSurvey, estimate, survey, why_ineligible
from compress.sparsity.masks import SparseMasks, Sparsifier, apply_2to4, is_sparse, sparse_layers
from compress.sparsity.pattern import PATTERN, mask_2to4, retained, satisfies
from compress.sparsity.semi_structured import to_semi_structured, why_unavailable
from compress.sparsity.verify import SparsityCheck, verify_model, verify_onnx

__all__ = [
    "PATTERN",
    "LayerSurvey",
    "SparseMasks",
    "Sparsifier",
    "SparsityCheck",
    "apply_2to4",
    "estimate",
    "is_sparse",
    "mask_2to4",
    "retained",
    "satisfies",
    "sparse_layers",
    "survey",
    "to_semi_structured",
    "verify_model",
    "verify_onnx",
    "why_ineligible",
    "why_unavailable",
]
