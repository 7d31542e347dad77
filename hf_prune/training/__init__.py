from .plugin import TrainingPlugin, get_training_plugin_class, register_training_plugin
from .trainer import PruningTrainer
