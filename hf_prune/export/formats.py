"""Export formats: how a pruned model is written and rebuilt, pluggable by name.

A format decides two things:

1. `prepare_model(model, qconfig)`: runs on the freshly built (meta-device) model inside `from_pretrained`, *before*
   weights are loaded. The default `"sparse"` format leaves the model as built. A structured format (CoFi: physically
   smaller, heterogeneous layers) reshapes modules here from what it stored in `qconfig.format_config`.
2. `compress_state_dict(model, state_dict, qconfig)`: turns the dense state dict into the tensors written to disk
   (by default: sparse weights through the codecs of `codecs.py`, everything else unchanged).

Register a new format with [`register_export_format`]:

```python
@register_export_format("structured")
class StructuredFormat(ExportFormat):
    def format_config(self, model, state):          # saved in config.json under quantization_config.format_config
        return {"shapes": {...}}
    def prepare_model(self, model, qconfig):         # shrink the meta model to qconfig.format_config["shapes"]
        ...
```
and make the pruned model select it: `PruningState.metrics["export_format"] = "structured"` (or
`enable_compressed_save(model, format="structured")`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from .codecs import META_SUFFIX, Encoded, decode, get_codec, index_suffixes, parallel_map

logger = logging.getLogger(__name__)

_FORMATS: dict[str, type["ExportFormat"]] = {}


def register_export_format(name: str, *, override: bool = False):
    """Class decorator registering an [`ExportFormat`] subclass under `name` (stored in `config.json`)."""

    def decorator(cls):
        if not (isinstance(cls, type) and issubclass(cls, ExportFormat)):
            raise TypeError(f"register_export_format({name!r}) decorates ExportFormat subclasses, got {cls!r}")
        if name in _FORMATS and _FORMATS[name] is not cls and not override:
            raise ValueError(f"Export format {name!r} is already registered; pass override=True to replace it")
        cls.name = name
        _FORMATS[name] = cls
        return cls

    return decorator


def get_export_format(name: str) -> "ExportFormat":
    try:
        return _FORMATS[name]()
    except KeyError:
        raise ValueError(
            f"Unknown hf_prune export format {name!r} (registered: {sorted(_FORMATS)}). The checkpoint was written by "
            "a plugin that is not imported; import the package that registers it before from_pretrained."
        ) from None


def parse_layout(layout: str) -> list[tuple[str, dict]]:
    """Codec candidates for a `PruningState.layout`, most specific first. Bitmask is always a candidate."""
    if not isinstance(layout, str):
        raise ValueError(f"layout must be a string, got {layout!r}")
    candidates: list[tuple[str, dict]] = []
    if ":" in layout and layout.replace(":", "").isdigit():
        n, m = (int(v) for v in layout.split(":"))
        candidates.append(("nm", {"n": n, "m": m}))
    elif layout.startswith("block:"):
        try:
            r, c = (int(v) for v in layout[len("block:") :].lower().split("x"))
        except ValueError:
            raise ValueError(f"block layout must look like 'block:16x16', got {layout!r}") from None
        candidates.append(("block", {"block": (r, c)}))
    elif layout not in ("unstructured", "structured"):
        raise ValueError(f"layout must be 'unstructured', 'structured', 'N:M' or 'block:RxC', got {layout!r}")
    candidates.append(("bitmask", {}))
    return candidates


@dataclass
class CompressionReport:
    """What `compress_state_dict` did, per compressed parameter: codec, bytes on disk, dense bytes."""

    entries: dict[str, dict] = field(default_factory=dict)

    @property
    def dense_bytes(self) -> int:
        return sum(e["dense_bytes"] for e in self.entries.values())

    @property
    def stored_bytes(self) -> int:
        return sum(e["bytes"] for e in self.entries.values())


def encode_best(weight: torch.Tensor, layout: str) -> Encoded | None:
    """The smallest valid encoding of `weight` for `layout`, or `None` when storing it dense is smaller."""
    dense = weight.numel() * weight.element_size()
    best = None
    for codec_name, params in parse_layout(layout):
        if codec_name == "bitmask" and best is not None and best.nonzero >= 0:
            # the bitmask's size follows from the non-zero count: encode it only when it would win
            rows, cols = weight.shape
            if best.nonzero * weight.element_size() + rows * -(-cols // 8) + 16 >= best.nbytes:
                continue
        enc = get_codec(codec_name).encode(weight, **params)
        if enc is not None and enc.nbytes < dense and (best is None or enc.nbytes < best.nbytes):
            best = enc
    return best


class ExportFormat:
    """Default behaviour (the `"sparse"` format); see the module docstring for the hooks."""

    name = "sparse"

    def format_config(self, model: torch.nn.Module, state) -> dict:
        return {}

    def prepare_model(self, model: torch.nn.Module, qconfig) -> None:
        return None

    def finalize_model(self, model: torch.nn.Module, qconfig) -> None:
        return None

    def candidate_parameters(self, model: torch.nn.Module, state_dict: dict, qconfig) -> list[str]:
        """Parameters to try compressing: the pruned modules' weights, or every 2-D weight when none are listed."""
        modules = list(qconfig.pruned_modules())
        if modules:
            return [f"{m}.weight" for m in modules if f"{m}.weight" in state_dict]
        return [k for k, v in state_dict.items() if k.endswith(".weight") and v.dim() == 2]

    def compress_state_dict(self, model, state_dict: dict, qconfig) -> tuple[dict, CompressionReport]:
        names = self.candidate_parameters(model, state_dict, qconfig)
        return compress_tensors(state_dict, qconfig.layout, names)


def compress_tensors(tensors: dict[str, torch.Tensor], layout: str, names=None, *,
                     parallel: bool = True) -> tuple[dict, CompressionReport]:
    """Encodes the sparse 2-D float weights of `tensors` with the smallest codec for `layout`; the rest is unchanged.

    Args:
        tensors: dense `{key: tensor}` (a whole state dict, or one block's weights when streaming a checkpoint).
        layout: the pruning layout (`"unstructured"`, `"2:4"`, `"block:16x16"`).
        names: keys to try compressing (default: every 2-D `*.weight`); a weight that is not smaller compressed
            stays dense, with a warning.
        parallel: encode the weights on the codec threads (numpy releases the GIL); `False` encodes one at a time,
            for callers bounded by memory (the offloaded runner: concurrent encodes hold their temporaries at once).

    Returns:
        The tensors to write (each compressed weight replaced by its group, in place of the original key) and a
        [`CompressionReport`] (codec, bytes and non-zero count per tried weight).
    """
    if names is None:
        names = [k for k, v in tensors.items() if k.endswith(".weight") and v.dim() == 2]
    names = set(names)
    out: dict[str, torch.Tensor] = {}
    report = CompressionReport()
    fell_back = []
    todo = [name for name, weight in tensors.items()
            if name in names and isinstance(weight, torch.Tensor) and weight.dim() == 2 and weight.is_floating_point()]
    # Weights are encoded on the codec threads (numpy releases the GIL), the results kept in the state dict's order.
    encode = parallel_map if parallel else (lambda fn, items: [fn(x) for x in items])
    encoded = dict(zip(todo, encode(lambda name: encode_best(tensors[name].detach(), layout), todo)))
    for name, weight in tensors.items():
        if name not in encoded:
            out[name] = weight
            continue
        enc = encoded.pop(name)
        dense_bytes = weight.numel() * weight.element_size()
        if enc is None:
            fell_back.append(name)
            out[name] = weight
            report.entries[name] = {"codec": "dense", "bytes": dense_bytes, "dense_bytes": dense_bytes,
                                    "nonzero": int(torch.count_nonzero(weight)), "numel": weight.numel()}
            continue
        for suffix, tensor in enc.tensors.items():
            out[name + suffix] = tensor
        report.entries[name] = {"codec": enc.codec, "bytes": enc.nbytes, "dense_bytes": dense_bytes,
                                "nonzero": enc.nonzero, "numel": weight.numel()}
    if fell_back:
        logger.warning(
            "hf_prune: %d of %d pruned weights are not sparse enough to be smaller compressed and are stored "
            "dense (were they fine-tuned without their masks?): %s",
            len(fell_back), len(report.entries), ", ".join(fell_back[:5]) + (" ..." if len(fell_back) > 5 else ""),
        )
    return out, report


register_export_format("sparse")(ExportFormat)


def split_key(key: str) -> tuple[str, str]:
    """`("P.weight", "_hf_prune_bitmask")` for a companion key, `(key, "")` otherwise."""
    for suffix in (*index_suffixes(), META_SUFFIX):
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    return key, ""


def is_compressed_state_dict(keys) -> bool:
    return any(split_key(k)[1] for k in keys)


def decompress_state_dict(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dense state dict from a compressed one (e.g. `safetensors.torch.load_file` of a compressed shard)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        base, suffix = split_key(key)
        groups.setdefault(base, {})[suffix] = tensor
    out = {}
    for base, group in groups.items():
        out[base] = decode(base, group) if len(group) > 1 or "" not in group else group[""]
    return out
