"""`DynSparseConfig`: always-sparse pre-training with a moving sparsity pattern (Dietrich et al., "Towards
Structured Dynamic Sparse Pre-Training of BERT"), plus the paper's sparse learning-rate rule."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ...config import (
    REGEX,
    PruningConfig,
    check_choice,
    check_open_unit_interval,
    check_positive_int,
    register_pruning_method,
)

BLOCK_METRICS = ("l1", "l2", "linf")
PRUNING_RATIO_DECAYS = ("cosine", "constant")
REGROWTH_MODES = ("random", "gradient")

# Paper, appendix A.1: the best number of pattern updates at s = 0.9 (160 for 1x1 blocks, 80 for 16x16).
_PAPER_UPDATES_UNSTRUCTURED = 160
_PAPER_UPDATES_BLOCK = 80


def sparse_learning_rate(dense_learning_rate: float, sparsity: float) -> float:
    """The paper's learning-rate rule for sparse models (eq. 3): η(s) = η(0) · exp(1.969 s² + 0.2905 s).

    Args:
        dense_learning_rate (`float`): the tuned learning rate η(0) of the dense model of the same shape.
        sparsity (`float`): the sparsity s in [0, 1).

    Returns:
        `float`: the predicted optimal learning rate of the sparse model.
    """
    if isinstance(dense_learning_rate, bool) or not isinstance(dense_learning_rate, (int, float)) or dense_learning_rate <= 0:
        raise ValueError(f"sparse_learning_rate: dense_learning_rate must be a number > 0, got {dense_learning_rate!r}")
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparse_learning_rate: sparsity must be a number in [0, 1), got {sparsity!r}")
    return float(dense_learning_rate) * math.exp(1.969 * sparsity**2 + 0.2905 * sparsity)


@register_pruning_method("dynsparse")
@dataclass(kw_only=True)
class DynSparseConfig(PruningConfig):
    """Configuration of DynSparse training: every selected `Linear` keeps the same fraction of non-zero weights
    during the whole run, while the pattern moves by periodic magnitude pruning and regrowth.

    Args:
        sparsity (`float`, defaults to 0.9): fraction of zero weights in every sparse layer, in (0, 1).
        block_size (`int` or `[rows, cols]`, defaults to 1): the pattern's granularity; `B` means B×B blocks
            (1 = unstructured; the paper studies 1, 4, 8, 16). Must divide every sparse weight's shape.
        block_metric (`str`, defaults to `"l1"`): block score for pruning: `"l1"`, `"l2"` or `"linf"` norm.
        num_updates (`int`, *optional*): number of pattern updates, spread evenly over the update stretch. Defaults
            to the paper's best values: 160 for unstructured, 80 for blocks. Exclusive with `update_interval`.
        update_interval (`int`, *optional*): alternatively, update the pattern every this many optimizer steps.
        update_start (`float`, defaults to 0.0) and update_end (`float`, defaults to 1.0): the stretch of training,
            as fractions of the total optimizer steps, in which pattern updates happen.
        pruning_ratio (`float`, defaults to 0.5): the maximum fraction pr of active blocks replaced at an update.
        pruning_ratio_decay (`str`, defaults to `"cosine"`): `"cosine"`: pr(t) = pr·½(1 + cos(π t / T)), with T the
            total optimizer steps; `"constant"`: pr(t) = pr.
        regrowth (`str`, defaults to `"random"`): `"random"` regrows uniformly among blocks that were inactive before
            the update; `"gradient"` (RigL) regrows those with the largest dense-gradient L1 norm.
        target_modules (`list[str]` or `str`, *optional*): which `Linear` modules are sparse: a list of names or
            name suffixes, or a regular expression matched against the full name. Default: every `Linear` in the
            transformer blocks (the model's largest `ModuleList`), i.e. all non-embedding weights of the encoder /
            decoder layers.
        exclude_modules (`list[str]` or `str`, *optional*): modules removed from the selection, same syntax.
        seed (`int`, defaults to 0): seed of the initial pattern and of random regrowth (identical on every rank).
    """

    sparsity: float = 0.9
    block_size: int | list[int] = 1
    block_metric: str = "l1"
    num_updates: int | None = None
    update_interval: int | None = None
    update_start: float = 0.0
    update_end: float = 1.0
    pruning_ratio: float = 0.5
    pruning_ratio_decay: str = "cosine"
    regrowth: str = "random"
    target_modules: list[str] | str | None = field(default=None, metadata=REGEX)
    exclude_modules: list[str] | str | None = field(default=None, metadata=REGEX)
    seed: int = 0

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        check_open_unit_interval(owner, "sparsity", self.sparsity)
        if isinstance(self.block_size, (list, tuple)):
            if len(self.block_size) != 2:
                raise ValueError(f"{owner}.block_size must be an int or a pair [rows, cols], got {self.block_size!r}")
            for value in self.block_size:
                check_positive_int(owner, "block_size", value)
            self.block_size = [int(v) for v in self.block_size]
        else:
            check_positive_int(owner, "block_size", self.block_size)
        check_choice(owner, "block_metric", self.block_metric, BLOCK_METRICS)
        if self.num_updates is not None and self.update_interval is not None:
            raise ValueError(f"{owner}: set num_updates or update_interval, not both")
        if self.num_updates is not None:
            check_positive_int(owner, "num_updates", self.num_updates)
        if self.update_interval is not None:
            check_positive_int(owner, "update_interval", self.update_interval)
        for name in ("update_start", "update_end"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{owner}.{name} must be a fraction of training in [0, 1], got {value!r}")
        if self.update_start >= self.update_end:
            raise ValueError(
                f"{owner}.update_start ({self.update_start}) must be smaller than update_end ({self.update_end})"
            )
        value = self.pruning_ratio
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
            raise ValueError(f"{owner}.pruning_ratio must be a number in (0, 1], got {value!r}")
        check_choice(owner, "pruning_ratio_decay", self.pruning_ratio_decay, PRUNING_RATIO_DECAYS)
        check_choice(owner, "regrowth", self.regrowth, REGROWTH_MODES)
        for name in ("target_modules", "exclude_modules"):
            value = getattr(self, name)
            if value is None or isinstance(value, str):
                continue
            if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
                raise ValueError(f"{owner}.{name} must be a regex string or a list of module names, got {value!r}")
            setattr(self, name, list(value))
        check_positive_int(owner, "seed", self.seed, allow_zero=True)

    @property
    def block_shape(self) -> tuple[int, int]:
        """(rows, cols) of one block."""
        if isinstance(self.block_size, (list, tuple)):
            return int(self.block_size[0]), int(self.block_size[1])
        return int(self.block_size), int(self.block_size)

    @property
    def layout(self) -> str:
        """The `PruningState` layout: `"unstructured"` or `"block:RxC"`."""
        rows, cols = self.block_shape
        return "unstructured" if rows == cols == 1 else f"block:{rows}x{cols}"

    @property
    def resolved_num_updates(self) -> int | None:
        """`num_updates`, or the paper's default when neither it nor `update_interval` is set."""
        if self.num_updates is not None or self.update_interval is not None:
            return self.num_updates
        return _PAPER_UPDATES_UNSTRUCTURED if self.block_shape == (1, 1) else _PAPER_UPDATES_BLOCK

    def learning_rate(self, dense_learning_rate: float) -> float:
        """The paper's learning-rate rule at this config's sparsity; see [`sparse_learning_rate`]."""
        return sparse_learning_rate(dense_learning_rate, self.sparsity)
