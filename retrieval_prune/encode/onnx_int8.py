"""The query forward pass as an ONNX Runtime int8 session (``precision="int8-onnx"``).

:func:`onnx_int8_model` exports a :class:`~retrieval_prune.encode.model.ColBERTModel` to ONNX
(the TorchScript exporter, dynamic batch and length), quantises every MatMul with
``onnxruntime.quantization.quantize_dynamic`` (int8 weights per output channel, uint8
activations over each call's min/max, full 8-bit range) and wraps the session in an
``nn.Module`` whose call matches ``ColBERTModel``'s, so the encoder's batching code runs it
unchanged. Needs the optional packages ``onnx`` and ``onnxruntime``.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from retrieval_prune.encode.model import ColBERTModel, EncoderOutput

__all__ = ["ONNX_INT8_RECIPE", "OnnxQueryModel", "onnx_int8_model"]

_INSTALL = "pip install onnx onnxruntime"

#: What ``precision="int8-onnx"`` does (recorded in the encoder's settings).
ONNX_INT8_RECIPE: dict[str, Any] = {
    "method": "onnxruntime.quantization.quantize_dynamic",
    "modules": "every MatMul with a constant weight (all Linear layers) of the query pass",
    "weights": "qint8, per output channel",
    "activations": "quint8, per tensor, min/max of each call, full range",
    "export": "torch.onnx TorchScript exporter, opset 17",
    "documents": "float32",
}


def _require() -> tuple[Any, Any]:
    try:
        import onnx  # noqa: F401
        import onnxruntime as ort
        from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as exc:
        raise ImportError(
            f"precision='int8-onnx' needs ONNX Runtime and onnx: {_INSTALL} "
            "(or use precision='int8', torch's own int8)"
        ) from exc
    return ort, (quantize_dynamic, QuantType)


class _Vectors(nn.Module):
    def __init__(self, model: ColBERTModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor, vmask: torch.Tensor) -> torch.Tensor:
        return self.model(ids, mask, vmask).vectors


class OnnxQueryModel(nn.Module):
    """An ONNX Runtime session with ``ColBERTModel``'s call signature (no importance)."""

    def __init__(self, session: Any, dim: int) -> None:
        super().__init__()
        self.session = session
        self._dim = dim
        self.eval()

    @property
    def dim(self) -> int:
        return self._dim

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        vector_mask: torch.Tensor | None = None,
        *,
        return_importance: bool = False,
    ) -> EncoderOutput:
        if return_importance:
            raise ValueError(
                "precision='int8-onnx' returns no attention importance; encode queries with "
                "return_importance=False, or use precision='int8' or 'float32'"
            )
        vmask = attention_mask if vector_mask is None else vector_mask
        out = self.session.run(
            None,
            {
                "input_ids": input_ids.numpy().astype(np.int64, copy=False),
                "attention_mask": attention_mask.numpy().astype(np.int64, copy=False),
                "vector_mask": vmask.numpy().astype(np.bool_, copy=False),
            },
        )[0]
        return EncoderOutput(torch.from_numpy(out), vmask.bool(), None)


def onnx_int8_model(model: ColBERTModel, num_threads: int | None = None,
                    keep_float: tuple[str, ...] = ()) -> OnnxQueryModel:
    """Export ``model``, quantise it to int8 with ONNX Runtime, and open a CPU session.

    ``num_threads``: intra-op threads of the session (None: ONNX Runtime's default).
    ``keep_float``: MatMul nodes whose name contains one of these strings stay float32
    (e.g. ``"/projection/"``, ``"/output/dense/"``: the FFN down-projections, whose inputs
    carry BERT's activation outliers). ``model`` is not changed (it is exported in eval mode
    and left as it was).
    """
    ort, (quantize_dynamic, quant_type) = _require()
    was_training = model.training
    model.eval()
    ids = torch.tensor([[101, 2023, 2003, 102]], dtype=torch.long)
    mask = torch.ones_like(ids)
    vmask = torch.ones_like(ids, dtype=torch.bool)
    axes = {0: "batch", 1: "seq"}
    try:
        with tempfile.TemporaryDirectory(prefix="rp-onnx-") as tmp:
            f32, i8 = Path(tmp) / "model.onnx", Path(tmp) / "model.int8.onnx"
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")
                torch.onnx.export(
                    _Vectors(model), (ids, mask, vmask), str(f32),
                    input_names=["input_ids", "attention_mask", "vector_mask"],
                    output_names=["vectors"],
                    dynamic_axes={
                        "input_ids": axes, "attention_mask": axes, "vector_mask": axes,
                        "vectors": axes,
                    },
                    opset_version=17, dynamo=False,
                )
                before = logging.root.manager.disable
                logging.disable(logging.WARNING)  # "consider pre-processing" on the root logger
                exclude = []
                if keep_float:
                    import onnx

                    exclude = [n.name for n in onnx.load(str(f32)).graph.node
                               if n.op_type == "MatMul" and any(k in n.name for k in keep_float)]
                try:
                    quantize_dynamic(
                        str(f32), str(i8), weight_type=quant_type.QInt8, per_channel=True,
                        nodes_to_exclude=exclude,
                    )
                finally:
                    logging.disable(before)
            so = ort.SessionOptions()
            if num_threads is not None:
                so.intra_op_num_threads = int(num_threads)
            so.inter_op_num_threads = 1
            session = ort.InferenceSession(
                str(i8), so, providers=["CPUExecutionProvider"]
            )
    finally:
        if was_training:
            model.train()
    return OnnxQueryModel(session, model.dim)
