"""`OneShotConfig`: the options every one-shot (calibrate-then-prune) method shares."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..config import (
    REGEX,
    PruningConfig,
    check_choice,
    check_open_unit_interval,
    check_positive_int,
    check_positive_number,
)

_NM = re.compile(r"^(\d+):(\d+)$")


def parse_pattern(owner: str, pattern: str) -> tuple[int, int] | None:
    """`"unstructured"` -> None; `"N:M"` -> (N, M) with 0 < N < M. Raises naming `owner.pattern` otherwise."""
    if pattern == "unstructured":
        return None
    match = _NM.match(pattern) if isinstance(pattern, str) else None
    if match is None:
        raise ValueError(f"{owner}.pattern must be 'unstructured' or 'N:M' (e.g. '2:4', '4:8'), got {pattern!r}")
    n, m = int(match.group(1)), int(match.group(2))
    if not 0 < n < m:
        raise ValueError(f"{owner}.pattern {pattern!r}: N:M needs 0 < N < M (N weights kept in every M), got N={n}, M={m}")
    return n, m


@dataclass(kw_only=True)
class OneShotConfig(PruningConfig):
    """Options shared by ADMM, Wanda, SparseGPT and magnitude pruning.

    Args:
        sparsity (`float`, *optional*):
            Fraction of weights set to zero in every pruned module, in (0, 1). Required for `"unstructured"`;
            for `"N:M"` it is implied (1 - N/M) and may be omitted.
        pattern (`str`, defaults to `"unstructured"`):
            `"unstructured"` or `"N:M"` (keep exactly N of every M consecutive input weights of each row).
        targets (`list[str]`, *optional*):
            Modules to prune: regexes matched against the full module name or its end from a dot boundary, so
            `"q_proj"`, `"mlp.down_proj"`, `"self_attn\\..*"` and full names all work. Default: every `Linear` (and GPT-2 `Conv1D`) inside the transformer blocks. Embeddings
            and the LM head are never pruned.
        ignore (`list[str]`):
            Modules to leave dense, same matching rules as `targets`.
        num_calibration_samples (`int`, defaults to 128):
            Number of calibration sequences.
        max_seq_length (`int`, defaults to 512):
            Tokens per calibration sequence; text is concatenated and cut into windows of this length.
        calibration_batch_size (`int`, defaults to 8):
            Sequences per forward pass while calibrating.
        sparsity_overrides (`dict[str, float]`):
            Per-module sparsity, `{pattern: sparsity}` (matching as for `targets`; first match wins).
            Unstructured only.
        owl (`bool`, defaults to `False`):
            Outlier-weighted layer-wise sparsity (Yin et al., 2023): blocks with more activation outliers keep more
            weights; the mean over blocks stays `sparsity`. Unstructured only.
        owl_lambda (`float`, defaults to 0.08): maximum deviation of a block's sparsity from `sparsity`.
        owl_threshold (`float`, defaults to 5.0): a score is an outlier above this multiple of its block's mean.
        seed (`int`, defaults to 0): seed for choosing calibration windows.
    """

    sparsity: float | None = None
    pattern: str = "unstructured"
    targets: list[str] | None = field(default=None, metadata=REGEX)
    ignore: list[str] = field(default_factory=list, metadata=REGEX)
    num_calibration_samples: int = 128
    max_seq_length: int = 512
    calibration_batch_size: int = 8
    sparsity_overrides: dict[str, float] = field(default_factory=dict, metadata=REGEX)
    owl: bool = False
    owl_lambda: float = 0.08
    owl_threshold: float = 5.0
    seed: int = 0

    #: whether the method needs calibration activations at all (magnitude pruning does not, unless OWL is on)
    needs_calibration = True

    def validate(self) -> None:
        super().validate()
        owner = type(self).__name__
        nm = parse_pattern(owner, self.pattern)
        if nm is None:
            if self.sparsity is None:
                raise ValueError(f"{owner}.sparsity is required for unstructured pruning (a number in (0, 1))")
            check_open_unit_interval(owner, "sparsity", self.sparsity)
        else:
            implied = 1.0 - nm[0] / nm[1]
            if self.sparsity is None:
                self.sparsity = implied
            else:
                check_open_unit_interval(owner, "sparsity", self.sparsity)
                if abs(self.sparsity - implied) > 1e-9:
                    raise ValueError(
                        f"{owner}.sparsity={self.sparsity} contradicts pattern {self.pattern!r}, which implies "
                        f"sparsity {implied:g}; omit sparsity or set it to {implied:g}"
                    )
            if self.sparsity_overrides:
                raise ValueError(f"{owner}.sparsity_overrides needs pattern='unstructured', got {self.pattern!r}")
            if self.owl:
                raise ValueError(f"{owner}.owl needs pattern='unstructured', got {self.pattern!r}")
        for name in ("targets", "ignore"):
            value = getattr(self, name)
            if value is None and name == "targets":
                continue
            if isinstance(value, str) or not isinstance(value, (list, tuple)) or not all(
                isinstance(p, str) and p for p in value
            ):
                raise ValueError(f"{owner}.{name} must be a list of non-empty module names or regexes, got {value!r}")
        if self.targets is not None and not self.targets:
            raise ValueError(f"{owner}.targets is empty; omit it to prune every Linear in the transformer blocks")
        if not isinstance(self.sparsity_overrides, dict):
            raise ValueError(f"{owner}.sparsity_overrides must be a dict {{module pattern: sparsity}}")
        for pattern, value in self.sparsity_overrides.items():
            check_open_unit_interval(owner, f"sparsity_overrides[{pattern!r}]", value)
        check_positive_int(owner, "num_calibration_samples", self.num_calibration_samples)
        check_positive_int(owner, "max_seq_length", self.max_seq_length)
        check_positive_int(owner, "calibration_batch_size", self.calibration_batch_size)
        check_choice(owner, "owl", self.owl, (True, False))
        check_open_unit_interval(owner, "owl_lambda", self.owl_lambda)
        check_positive_number(owner, "owl_threshold", self.owl_threshold)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"{owner}.seed must be an integer, got {self.seed!r}")
        if self.owl and self.sparsity is not None:
            low, high = self.sparsity - self.owl_lambda, self.sparsity + self.owl_lambda
            if low <= 0 or high >= 1:
                raise ValueError(
                    f"{owner}.owl_lambda={self.owl_lambda} with sparsity={self.sparsity} would give block sparsities "
                    f"in [{low:g}, {high:g}], outside (0, 1); lower owl_lambda"
                )

    @property
    def n_m(self) -> tuple[int, int] | None:
        return parse_pattern(type(self).__name__, self.pattern)

    @property
    def uses_calibration(self) -> bool:
        return self.needs_calibration or self.owl


def name_matches(pattern: str, name: str) -> bool:
    """A pattern matches a module's full name, or its end from a dot boundary, as a regex: `"q_proj"`,
    `"mlp.down_proj"`, `"self_attn\\..*"`, `"layers\\.[0-3]\\..*"` and `"model.layers.0.mlp.up_proj"` all work."""
    return name == pattern or re.search(r"(?:^|\.)(?:" + pattern + r")$", name) is not None
