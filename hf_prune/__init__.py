"""hf_prune: pruning for the Hugging Face stack."""

from .config import PruningConfig, get_config_class, register_pruning_method, registered_methods
from .state import PruningState, get_pruning_state, set_pruning_state
from .version import __version__
from .methods.admm import ADMMConfig
from .methods.magnitude import MagnitudeConfig
from .methods.sparsegpt import SparseGPTConfig
from .methods.wanda import WandaConfig
from .oneshot import OneShotConfig, oneshot

# Export: importing registers the `quant_method="hf_prune"` loader with transformers (from_pretrained of compressed
# checkpoints) and exposes the save / push / info functions.
from .export import describe_export, push_pruned, save_pruned
from .methods.cofi import CoFiConfig
from .methods.structured import StructuredConfig
from .methods.dynsparse import DynSparseCallback, DynSparseConfig, attach, sparse_learning_rate
from .training import DistillationConfig, TrainingPlugin, register_training_plugin
from .evaluation import evaluate_lm, perplexity


def __getattr__(name):
    # Lazy: `PruningTrainer` pulls in `transformers.Trainer`, which one-shot pruning and loading never need.
    if name == "PruningTrainer":
        from .training.trainer import PruningTrainer

        return PruningTrainer
    if name == "distill":  # lazy like PruningTrainer, which it runs
        from .training.distill import distill

        return distill
    if name == "get_sparse_peft_model":  # lazy: imports peft only when recovery is used
        from .peft import get_sparse_peft_model

        return get_sparse_peft_model
    # Lazy: the ONNX export needs onnxruntime and onnx (the `bench` extra), which training and loading never need.
    if name in ("export_onnx", "OnnxModel"):
        from . import deploy

        return getattr(deploy, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The public API (also what ruff checks the imports above against). `PruningTrainer` is lazy but needs only
# transformers; the lazy names that need an optional extra (`get_sparse_peft_model`: peft; `export_onnx`,
# `OnnxModel`: onnx + onnxruntime) stay out, so `from hf_prune import *` works without the extras.
__all__ = [
    "__version__",
    "PruningConfig", "get_config_class", "register_pruning_method", "registered_methods",
    "PruningState", "get_pruning_state", "set_pruning_state",
    "OneShotConfig", "oneshot", "ADMMConfig", "MagnitudeConfig", "SparseGPTConfig", "WandaConfig",
    "describe_export", "push_pruned", "save_pruned",
    "CoFiConfig", "StructuredConfig",
    "DynSparseCallback", "DynSparseConfig", "attach", "sparse_learning_rate",
    "PruningTrainer", "TrainingPlugin", "register_training_plugin", "DistillationConfig", "distill",
    "evaluate_lm", "perplexity",
]
