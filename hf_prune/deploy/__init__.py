"""Deployment of pruned models to ONNX Runtime: `export_onnx` (torch.onnx export in optimum's directory layout,
checked against PyTorch, int8 on top) and `OnnxModel` (from the torch-free `hf_prune_ort` package)."""

try:
    import onnx  # noqa: F401  (the exporter's external data and the int8 quantizer need it)
    import onnxruntime  # noqa: F401
except ImportError as err:
    raise ImportError(f"hf_prune's ONNX export needs onnx and onnxruntime ({err}); install them with "
                      "pip install 'hf_prune[deploy]'") from err

from hf_prune_ort import OnnxModel, OnnxOutput

from .export import ExportVerificationError, OnnxExportReport, export_onnx
from .tasks import TASK_CHOICES, TASKS

__all__ = ["ExportVerificationError", "OnnxExportReport", "OnnxModel", "OnnxOutput", "TASKS", "TASK_CHOICES",
           "export_onnx"]
