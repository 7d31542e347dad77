"""The per-layer interface between the block-sequential runner and a one-shot method.

The runner feeds each target layer's calibration inputs into a `LayerStats`, then asks the method's `LayerSolver` for
the pruned weight. Solvers see plain tensors in the `(out_features, in_features)` layout, never modules or models.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import OneShotConfig
from .parking import ParkedTensor


class LayerStats:
    """Running input statistics of one layer: the Gram matrix XᵀX (fp32) or only its diagonal."""

    def __init__(self, in_features: int, device: torch.device, full_gram: bool):
        self.tokens = 0
        self.full_gram = full_gram
        #: the caller never reads these statistics after the solve: a solver may overwrite `gram` (ADMM normalises
        #: it in place, one n x n matrix less at the run's memory peak). Set by the block-sequential runner.
        self.scratch = False
        self._parked: ParkedTensor | None = None
        if full_gram:
            self.gram = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        else:
            self.sq_norms = torch.zeros(in_features, dtype=torch.float32, device=device)

    def add(self, inputs: torch.Tensor) -> None:
        x = inputs.reshape(-1, inputs.shape[-1]).to(torch.float32)
        self.tokens += x.shape[0]
        if self.full_gram:
            self.gram.addmm_(x.T, x)
        else:
            self.sq_norms.add_(x.square().sum(dim=0))

    @property
    def parked(self) -> bool:
        return self._parked is not None

    def park(self) -> None:
        """Moves the statistics (exact bytes) into an anonymous temporary file and drops them until `restore`: a
        memory-bounded run's block holds only the statistics of the layer being solved (at 1B, `down_proj`'s
        5632 x 5632 Gram, 121 MiB, is not resident while the attention and gate/up layers are solved)."""
        if self._parked is None:
            field = "gram" if self.full_gram else "sq_norms"
            self._parked = ParkedTensor(getattr(self, field))
            setattr(self, field, None)

    def restore(self) -> None:
        """Reads parked statistics back, bit for bit; a no-op when they are resident."""
        if self._parked is not None:
            setattr(self, "gram" if self.full_gram else "sq_norms", self._parked.restore())
            self._parked = None

    @property
    def column_sq_norms(self) -> torch.Tensor:
        """Σ x_j² per input feature: Wanda's activation norm squared (the Gram diagonal)."""
        return self.gram.diagonal() if self.full_gram else self.sq_norms

    def check_finite(self, layer_name: str) -> None:
        values = self.gram if self.full_gram else self.sq_norms
        if not bool(torch.isfinite(values).all()):
            raise FloatingPointError(
                f"Calibration statistics of {layer_name} contain NaN/Inf: its inputs overflowed. Run the model in "
                "float32 or bfloat16 for pruning."
            )


@dataclass
class LayerTask:
    """One layer to prune: its name, dense weight `(out, in)` in fp32, target sparsity and optional fixed mask."""

    name: str
    weight: torch.Tensor
    sparsity: float
    n_m: tuple[int, int] | None
    stats: LayerStats | None
    mask: torch.Tensor | None = None


class LayerSolver:
    """Base class: subclasses implement `solve` and say which statistics they need."""

    #: whether `solve` needs the full Gram matrix (ADMM, SparseGPT) or only its diagonal (Wanda)
    full_gram = True
    #: the run is bounded by memory (offloaded): trade a little temporary-file I/O for resident memory where the
    #: solver can (ADMM parks its normalised Gram matrix while iterating). Set by the runner.
    low_memory = False

    def __init__(self, config: OneShotConfig):
        self.config = config

    def solve(self, task: LayerTask) -> torch.Tensor:
        """Returns the pruned weight `(out, in)` in fp32, exactly zero where pruned."""
        raise NotImplementedError

    def release(self) -> None:
        """Drops anything cached across the layers of one block (e.g. a factorisation shared by q/k/v)."""


_SOLVERS: dict[type[OneShotConfig], type[LayerSolver]] = {}


def register_solver(config_cls: type[OneShotConfig]):
    """Class decorator binding a `LayerSolver` to its config class."""

    def decorator(solver_cls: type[LayerSolver]) -> type[LayerSolver]:
        _SOLVERS[config_cls] = solver_cls
        return solver_cls

    return decorator


def build_solver(config: OneShotConfig) -> LayerSolver:
    for cls in type(config).__mro__:
        if cls in _SOLVERS:
            return _SOLVERS[cls](config)
    raise ValueError(
        f"{type(config).__name__} (method {config.method!r}) has no one-shot solver; one-shot methods: "
        f"{sorted(c.method for c in _SOLVERS)}"
    )
