"""Which ONNX opsets an export may use: those the TorchScript exporter writes and this ONNX Runtime runs."""

from __future__ import annotations

import functools

MIN_OPSET = 14  # scaled_dot_product_attention (every transformers attention) needs 14 in the TorchScript exporter


@functools.lru_cache(maxsize=None)
def ort_max_opset() -> int:
    """The newest default-domain opset this ONNX Runtime loads, found by loading a one-node model per opset (ms)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    best = MIN_OPSET
    for opset in range(MIN_OPSET, onnx.defs.onnx_opset_version() + 1):
        value = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
        graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [value],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        model.ir_version = 8
        try:
            ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        except Exception:  # noqa: BLE001 - ORT raises its own (unexported) error types for an unknown opset
            break
        best = opset
    return best


def check_opset(opset) -> int:
    """`opset` if the exporter can write it and ONNX Runtime can run it, else a ValueError naming the range."""
    import onnxruntime as ort
    import torch

    tracer_max = torch.onnx._constants.ONNX_TORCHSCRIPT_EXPORTER_MAX_OPSET
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise ValueError(f"opset must be an integer, got {opset!r}")
    ort_max = ort_max_opset()
    if opset > ort_max:
        raise ValueError(f"opset {opset} cannot run in ONNX Runtime {ort.__version__} (it runs opsets up to "
                         f"{ort_max}); choose an opset from {MIN_OPSET} to {min(ort_max, tracer_max)}")
    if not MIN_OPSET <= opset <= tracer_max:
        raise ValueError(f"opset {opset} is not supported: the torch.onnx exporter writes opsets {MIN_OPSET} to "
                         f"{min(ort_max, tracer_max)} for transformers models")
    return opset
