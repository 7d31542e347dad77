"""DynSparse: always-sparse pre-training with periodic magnitude pruning and regrowth (unstructured or B×B blocks)."""

from .callback import DynSparseCallback
from .config import DynSparseConfig, sparse_learning_rate
from .hook import DynSparseHook, attach
from .masks import BlockMask, select_sparse_modules
from .plugin import DynSparsePlugin
from .schedule import UpdateSchedule
from .updater import STATE_FILE, DynSparseUpdater

__all__ = [
    "BlockMask",
    "DynSparseCallback",
    "DynSparseConfig",
    "DynSparseHook",
    "DynSparsePlugin",
    "DynSparseUpdater",
    "STATE_FILE",
    "UpdateSchedule",
    "attach",
    "select_sparse_modules",
    "sparse_learning_rate",
]
