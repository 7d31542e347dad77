"""One schema for `config.json["quantization_config"]` of an hf_prune export, applied by every reader (the
`from_pretrained` config class, `load_compressed_state_dict`, `hf-prune info`) before any field is used, so that a
wrong JSON type is an error naming the file and the field instead of a `TypeError` from deep inside."""

from __future__ import annotations

import re

from .codecs import CorruptCheckpointError
from .reading import short

EXPORT_ID_KEY = "export_id"
_EXPORT_ID = re.compile(r"^[0-9a-f]{32}$")


def _is_number(value) -> bool:  # NaN is a number here: a diverged run records a NaN perplexity
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_quantization_config(qc, source, *, max_version: int, loading: bool = True) -> None:
    """Raises `CorruptCheckpointError` naming `source` and the field for anything the readers could not use."""
    from .formats import parse_layout
    from .summary import INTERNAL_METRICS, _is_quality_metric, is_speed_metric

    def bad(field: str, want: str, value):
        raise CorruptCheckpointError(
            f"hf_prune: {source}: quantization_config{field} must be {want}, got {short(value)}"
        )

    def optional_str(field: str, value):
        if value is not None and not isinstance(value, str):
            bad(field, "a string or null", value)

    if not isinstance(qc, dict):
        bad("", "a JSON object", qc)
    version = qc.get("format_version", 1)
    if type(version) is not int or not 1 <= version:
        bad(".format_version", f"an integer 1..{max_version}", version)
    for field in ("format", "layout"):
        if field in qc and not isinstance(qc[field], str):
            bad(f".{field}", "a string", qc[field])
    try:
        parse_layout(qc.get("layout", "unstructured"))
    except ValueError as err:
        bad(".layout", f"a valid layout ({err})", qc.get("layout"))
    if qc.get("format_config") is not None and not isinstance(qc["format_config"], dict):
        bad(".format_config", "a JSON object", qc["format_config"])
    optional_str(".hf_prune_version", qc.get("hf_prune_version"))
    export_id = qc.get(EXPORT_ID_KEY)
    if loading and version >= 3 and not (isinstance(export_id, str) and _EXPORT_ID.match(export_id)):
        bad(f".{EXPORT_ID_KEY}", "32 lowercase hex digits (format version 3 has one)", export_id)
    pruning = qc.get("pruning")
    if pruning is None:
        return
    if not isinstance(pruning, dict):
        bad(".pruning", "a JSON object or null", pruning)
    config = pruning.get("config")
    if config is not None and not isinstance(config, dict):
        bad(".pruning.config", "a JSON object", config)
    if isinstance(config, dict) and "method" in config and not isinstance(config["method"], str):
        bad(".pruning.config.method", "a string", config["method"])
    if "layout" in pruning and not isinstance(pruning["layout"], str):
        bad(".pruning.layout", "a string", pruning["layout"])
    for field in ("base_model", "command"):
        optional_str(f".pruning.{field}", pruning.get(field))
    sparsity = pruning.get("module_sparsity")
    if sparsity is not None:
        if not isinstance(sparsity, dict):
            bad(".pruning.module_sparsity", "a JSON object {module: fraction}", sparsity)
        for name, value in sparsity.items():
            if not (_is_number(value) and 0 <= value <= 1):
                bad(f".pruning.module_sparsity[{short(name)}]", "a number in [0, 1]", value)
    metrics = pruning.get("metrics")
    if metrics is not None:
        if not isinstance(metrics, dict):
            bad(".pruning.metrics", "a JSON object", metrics)
        for name, value in metrics.items():
            if name in INTERNAL_METRICS or isinstance(value, (dict, list)) or value is None:
                continue
            if (is_speed_metric(name) or _is_quality_metric(name) or name == "sparsity") and not _is_number(value):
                bad(f".pruning.metrics[{short(name)}]", "a number (a quality, speed or sparsity result)", value)
