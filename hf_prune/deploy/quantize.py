"""int8 on top of pruning: dynamic weight quantization of the checked fp32 graph, by ONNX Runtime's own tool."""

from __future__ import annotations

import logging
from pathlib import Path


def quantize_int8(source: Path, target: Path) -> None:
    """Writes `target`: `source` with int8 MatMul / Gemm weights (per output channel) and activations quantized at
    run time (`onnxruntime.quantization.quantize_dynamic`; optimum's `ORTQuantizer` dynamic mode does the same)."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))  # the quantizer logs to the root logger (skipped nodes, a pre-processing hint)
    try:
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8, per_channel=True,
                         op_types_to_quantize=["MatMul", "Gemm"])
    finally:
        root.setLevel(level)
