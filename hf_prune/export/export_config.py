"""The `quantization_config` of a compressed export (`HfPruneExportConfig`), built from the model's `PruningState`,
and the tensors a compressed save writes for it.

What both `quantizer.py` (the `from_pretrained` hook) and `save.py` (the compressed save) use, below both of them
(and below `checkpoint.py`, which checks a checkpoint's config with it), so that none of them imports another upward.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..state import PruningState, get_pruning_state
from ..version import __version__
from .formats import get_export_format

logger = logging.getLogger(__name__)

QUANT_METHOD = "hf_prune"
#: 3: an export id in config.json and every file, and a manifest of every tensor (`integrity.py`). 2: per-tensor
#: checksums in every safetensors file. 1: no checksums. All three are read.
FORMAT_VERSION = 3


class HfPruneExportConfig(QuantizationConfigMixin):
    """`config.json["quantization_config"]` of a compressed hf_prune checkpoint.

    Args:
        format: export format name (see [`register_export_format`]); `"sparse"` by default.
        layout: the pruning layout (`"unstructured"`, `"2:4"`, `"block:16x16"`, `"structured"`); picks the codecs.
        format_config: format-specific JSON (e.g. per-layer shapes of a structured model).
        pruning: the [`PruningState`] as JSON (`config`, `layout`, `module_sparsity`, `metrics`, `base_model`,
            `command`), so that a loaded model re-saves with the same model card.
        format_version: on-disk format version (1 to 3); a newer one than this hf_prune reads is an error.
        export_id: random id of one save (format version 3), also in every file's metadata and the manifest.
    """

    def __init__(
        self,
        format: str = "sparse",
        layout: str = "unstructured",
        format_config: dict | None = None,
        pruning: dict | None = None,
        format_version: int = FORMAT_VERSION,
        hf_prune_version: str | None = None,
        quant_method: str = QUANT_METHOD,
        export_id: str | None = None,
        **kwargs: Any,
    ):
        if quant_method != QUANT_METHOD:
            raise ValueError(f"HfPruneExportConfig.quant_method must be {QUANT_METHOD!r}, got {quant_method!r}")
        if isinstance(format_version, bool) or not isinstance(format_version, int) or format_version < 1:
            raise ValueError(
                f"hf_prune quantization_config.format_version must be an integer 1..{FORMAT_VERSION}, got "
                f"{format_version!r}: config.json is corrupted"
            )
        if format_version > FORMAT_VERSION:
            raise ValueError(
                f"This checkpoint uses hf_prune export format version {format_version!r}; this hf_prune "
                f"({__version__}) reads versions <= {FORMAT_VERSION}. Upgrade hf_prune."
            )
        from .schema import check_quantization_config

        check_quantization_config(
            {"format": format, "layout": layout, "format_config": format_config, "pruning": pruning,
             "format_version": format_version, "hf_prune_version": hf_prune_version, "export_id": export_id},
            "config.json", max_version=FORMAT_VERSION, loading=False,
        )
        if kwargs:
            logger.warning("Ignoring unknown keys in the hf_prune quantization_config: %s", sorted(kwargs))
        self.quant_method = QUANT_METHOD
        self.format = format
        self.layout = layout
        self.format_config = dict(format_config or {})
        self.pruning = pruning
        self.format_version = format_version
        self.hf_prune_version = hf_prune_version or __version__
        self.export_id = export_id

    def pruned_modules(self) -> list[str]:
        return list(((self.pruning or {}).get("module_sparsity") or {}).keys())

    @property
    def has_checksums(self) -> bool:
        return self.format_version >= 2


def check_export_config(data: dict, source="config.json") -> HfPruneExportConfig:
    """What the loader accepts, so that `hf-prune info` refuses exactly what `from_pretrained` refuses: the
    `quantization_config` passes the schema (`schema.py`), builds (quant method, format version) and names a
    registered export format. Errors name `source` and the field."""
    from .codecs import CorruptCheckpointError
    from .schema import check_quantization_config

    check_quantization_config(data, source, max_version=FORMAT_VERSION)
    try:
        qconfig = HfPruneExportConfig.from_dict(dict(data))
        get_export_format(qconfig.format)
    except CorruptCheckpointError:
        raise
    except ValueError as err:
        raise CorruptCheckpointError(f"{source}: {err}") from None
    return qconfig


# ---------------------------------------------------------------------------------------------- state <-> JSON
def state_to_dict(state: PruningState) -> dict:
    return {
        "config": state.config.to_dict(),
        "layout": state.layout,
        "module_sparsity": {k: float(v) for k, v in state.module_sparsity.items()},
        "metrics": _jsonable(state.metrics),
        "base_model": state.base_model,
        "command": state.command,
        **({"history": _jsonable(state.history)} if state.history else {}),  # absent for a model pruned once
    }


def state_from_dict(data: dict) -> PruningState | None:
    """Rebuilds the `PruningState`; `None` (with a warning) when the method's config class is not registered."""
    from ..config import PruningConfig

    try:
        config = PruningConfig.from_dict(data["config"])
    except (KeyError, ValueError, TypeError) as err:
        logger.warning("hf_prune: could not rebuild the pruning config from the checkpoint (%s)", err)
        return None
    return PruningState(
        config=config,
        layout=data.get("layout", "unstructured"),
        module_sparsity=dict(data.get("module_sparsity") or {}),
        metrics=dict(data.get("metrics") or {}),
        base_model=data.get("base_model"),
        command=data.get("command"),
        history=[r for r in data["history"] if isinstance(r, dict)] if isinstance(data.get("history"), list) else [],
    )


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


# ---------------------------------------------------------------------------------------- config of a model
def export_config_for(model, state: PruningState | None = None, format: str | None = None):
    """The `HfPruneExportConfig` describing `model` now (refreshed from its current `PruningState`)."""
    state = state or get_pruning_state(model)
    current = getattr(model.config, "quantization_config", None)
    current = current if isinstance(current, HfPruneExportConfig) else None
    if state is None:
        if current is None:
            raise ValueError("This model has no hf_prune PruningState; prune it with hf_prune first")
        current.format_version = FORMAT_VERSION  # what a save writes now, whatever version it was read from
        return current
    fmt_name = format or state.metrics.get("export_format") or (current.format if current else None)
    fmt_name = fmt_name or ("structured" if state.layout == "structured" and _has_format("structured") else "sparse")
    fmt = get_export_format(fmt_name)
    return HfPruneExportConfig(
        format=fmt_name, layout=state.layout, format_config=fmt.format_config(model, state), pruning=state_to_dict(state)
    )


def _has_format(name: str) -> bool:
    from .formats import _FORMATS

    return name in _FORMATS


def compressed_state_dict(model, qconfig=None):
    """The tensors a compressed save writes, and a [`CompressionReport`]. Tied duplicates are dropped first."""
    from transformers.modeling_utils import remove_tied_weights_from_state_dict

    qconfig = qconfig or export_config_for(model)
    state_dict = remove_tied_weights_from_state_dict(model.state_dict(), model)
    return get_export_format(qconfig.format).compress_state_dict(model, state_dict, qconfig)
