from .distill_config import DistillationConfig
from .plugin import TrainingPlugin, get_training_plugin_class, register_training_plugin


def __getattr__(name):
    # `PruningTrainer` imports `transformers.Trainer` (~90 MB of modules); one-shot pruning never needs it.
    if name == "PruningTrainer":
        from .trainer import PruningTrainer

        return PruningTrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DistillationConfig", "PruningTrainer", "TrainingPlugin", "get_training_plugin_class", "register_training_plugin"]
