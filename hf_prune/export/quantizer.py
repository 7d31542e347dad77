"""The `from_pretrained` hook: a transformers quantizer registered under `quant_method="hf_prune"`.

transformers 5 has public registries for third-party checkpoint formats (`register_quantization_config`,
`register_quantizer`). A compressed hf_prune checkpoint carries `quantization_config = {"quant_method": "hf_prune",
...}` in `config.json`; once `hf_prune` is imported, `AutoModelFor*.from_pretrained(dir)`:

1. builds the model as usual, then calls the export format's `prepare_model` (a no-op for sparse checkpoints);
2. loads every `*.weight` through [`HfPruneDecompress`], a weight-conversion op that rebuilds dense tensors from
   `weight` + `weight_hf_prune_*` companions (and passes dense weights through);
3. leaves an *ordinary* model: plain `nn.Linear` with dense weights, `is_quantized` unset (so `.half()`, `.to()` and
   `Trainer` behave as for any model). The quantizer stays attached as `model.hf_quantizer` only so that
   `save_pretrained` writes the compressed format again.

Without hf_prune, transformers logs "Unknown quantization type, got hf_prune ... we will skip the quantization" and
then refuses to load, because every compressed `P.weight` holds the kept values with a shape different from the
dense one (a size-mismatch error listing the `*_hf_prune_*` keys). It never loads random or zero weights silently.
"""

from __future__ import annotations

import copy
import logging
import os
from collections import defaultdict
from pathlib import Path

import torch
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer

from ..version import __version__
from .codecs import META_SUFFIX, decode, index_suffixes
from .export_config import (  # noqa: F401  (the config was defined here; `hf_prune.export.quantizer` still has it)
    FORMAT_VERSION,
    QUANT_METHOD,
    HfPruneExportConfig,
    check_export_config,
    compressed_state_dict,
)
from .formats import get_export_format

logger = logging.getLogger(__name__)

# What makes a model loaded by `postprocess_model` save in the compressed format again: `save.enable_compressed_save`,
# registered by save.py when `hf_prune.export` is imported (save.py imports this module, so this one cannot import it).
_enable_save: list = []


def register_enable_save(enable) -> None:
    """Sets the function `postprocess_model` calls as `enable(model, quantizer=self)` (see `_enable_save`)."""
    _enable_save[:] = [enable]


def disable_compressed_save(model) -> None:
    """Back to plain transformers behaviour (dense saves). `model.dequantize()` calls this."""
    for attr in ("save_pretrained", "push_to_hub"):
        model.__dict__.pop(attr, None)


class HfPruneDecompress(ConversionOps):
    """Weight-conversion op: `{weight, weight_hf_prune_<index>, weight_hf_prune_meta}` -> dense `weight`.

    Dense weights (no companions) pass through. The result is cast to the dtype of the model's parameter, since the
    loader hands quantizer-owned tensors over uncast.
    """

    def __init__(self, hf_quantizer: "HfPruneQuantizer"):
        self.hf_quantizer = hf_quantizer
        self._dtypes: tuple[int, dict[str, torch.dtype]] | None = None  # (id(model), {parameter name: dtype})

    def __deepcopy__(self, memo):
        # transformers deep-copies the converter holding this op once per checkpoint key; the op keeps no per-weight
        # state, and a deep copy would copy the quantizer and its whole config each time (~1.5 s on SmolLM2).
        return self

    @torch.no_grad()
    def convert(self, input_dict, source_patterns=None, target_patterns=None, full_layer_name=None, model=None, **kwargs):
        name = full_layer_name or "weight"
        group = {}
        for pattern, tensors in input_dict.items():
            if isinstance(tensors, list):
                if len(tensors) != 1:
                    raise ValueError(f"hf_prune: expected one tensor for {name}{pattern[len('weight'):]}, got {len(tensors)}")
                tensors = tensors[0]
            group[pattern[len("weight") :]] = tensors
        target = self._param_dtype(model, full_layer_name)
        decoder = getattr(self.hf_quantizer, "decoder", None)
        if set(group) == {""}:
            dense = group[""]
        elif (decoder is not None and decoder.workers and all(t.device.type == "cpu" for t in group.values())
              and (target is None or target == group[""].dtype)):
            return {name: decoder.submit(name, group)}  # filled on a worker; joined in `postprocess_model`
        else:
            dense = decode(name, group) if decoder is None else decoder.decode(name, group)
        if target is not None and dense.is_floating_point() and dense.dtype != target:
            dense = dense.to(target)
        return {name: dense}

    @property
    def reverse_op(self) -> ConversionOps:
        # Saving never reverses this op: the quantizer's `postprocess_model` removes it from `_weight_conversions`
        # and `get_state_dict_and_metadata` compresses the dense state dict itself.
        raise NotImplementedError("HfPruneDecompress is not reversed; hf_prune compresses on save")


    def _param_dtype(self, model, name) -> torch.dtype | None:
        """The dtype of the model's tensor `name` (one table per model: looking modules up per key cost 0.1 s)."""
        if model is None or name is None:
            return None
        if self._dtypes is None or self._dtypes[0] != id(model):
            tensors = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers(remove_duplicate=False))}
            self._dtypes = (id(model), {k: t.dtype for k, t in tensors.items()})
        return self._dtypes[1].get(name)


class _SharedOpsConverter(WeightConverter):
    """transformers' `WeightConverter` whose deep copy (made once per checkpoint key while loading: 700 times for
    SmolLM2) copies its containers one level deep and shares the conversion ops, instead of a full recursive copy
    that took 0.4 s per load. The converter being copied is a template that never holds tensors."""

    __slots__ = ()

    @classmethod
    def of(cls, converter: WeightConverter) -> WeightConverter:
        if type(converter) is not WeightConverter:
            return converter
        new = copy.copy(converter)
        new.__class__ = cls
        return new

    def __deepcopy__(self, memo):
        new = object.__new__(type(self))
        for slot in _CONVERTER_SLOTS:
            value = getattr(self, slot, _MISSING)
            if value is _MISSING:
                continue
            if isinstance(value, defaultdict):
                value = defaultdict(value.default_factory, {k: copy.copy(v) for k, v in value.items()})
            elif isinstance(value, (list, dict, set)):
                value = copy.copy(value)
            object.__setattr__(new, slot, value)  # WeightTransform.__setattr__ refuses to re-set the patterns
        return new


_MISSING = object()
_CONVERTER_SLOTS = tuple(dict.fromkeys(s for k in WeightConverter.__mro__ for s in getattr(k, "__slots__", ())))


class HfPruneQuantizer(HfQuantizer):
    """Loads hf_prune compressed checkpoints into ordinary dense models and re-compresses them on save."""

    requires_calibration = False
    serialized_names = {"weight": ["weight", *(f"weight{s}" for s in index_suffixes()), f"weight{META_SUFFIX}"]}

    def __init__(self, quantization_config, **kwargs):
        super().__init__(quantization_config, **kwargs)
        self.last_report = None  # CompressionReport of the latest save
        self.decoder = None  # ParallelDecoder of the load in progress (None: decode in line)
        self.export_format = get_export_format(quantization_config.format)

    # -------------------------------------------------------------------------------------------- loading
    def validate_environment(self, *args, **kwargs):
        return None

    def update_attn_implementation(self, config):
        # The one hook transformers calls with the config (which knows the local directory) *before* it resolves the
        # index's file names: every entry goes through the containment check here, so `from_pretrained` names a
        # hostile entry (".", a list, a number, a symlink out) as `info` and `load_compressed_state_dict` do, instead
        # of failing inside transformers with a raw `IsADirectoryError` / `TypeError`.
        directory = getattr(config, "name_or_path", None) or getattr(config, "_name_or_path", None)
        if isinstance(directory, str) and os.path.isdir(directory):
            from .checkpoint import weight_files

            weight_files(Path(directory))
        return super().update_attn_implementation(config)

    def update_dtype(self, dtype):
        return dtype

    def get_load_operations(self) -> dict:
        return {"deserialize": HfPruneDecompress}

    def get_weight_conversions(self):
        # The base class builds the same converters; ours deep-copies cheaply (see `_SharedOpsConverter`).
        return [_SharedOpsConverter.of(c) for c in super().get_weight_conversions()]

    def preprocess_model(self, model, dtype=None, **kwargs):
        # Deliberately not the base implementation: it marks the model `is_quantized`, which makes `.half()` raise
        # and `Trainer` refuse to fine-tune. The loaded model is an ordinary dense model.
        self.export_format.prepare_model(model, self.quantization_config)
        files = [f for f in kwargs.get("checkpoint_files") or [] if str(f).endswith(".safetensors")]
        self._export = None
        if files:
            from .checkpoint import changes_reported, check_files, checkpoint_export, open_files
            from .schema import check_quantization_config

            # Fail before loading, with the file and tensor named, rather than inside the loader's report (or, for
            # corruption that keeps the structure, not at all): the same checks as `hf-prune info`, with the dense
            # shapes of the model just built bounding every decoded size.
            qc = self.quantization_config
            check_quantization_config(qc.to_dict(), "config.json", max_version=FORMAT_VERSION)
            export = checkpoint_export(files, qc, getattr(model.config, "_name_or_path", None))
            with changes_reported(export.directory, export.export_id):
                opened = open_files(export.files)
                try:
                    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
                    check_files(export, opened, shapes=shapes)
                finally:
                    for f in opened:
                        f.close()
            self._export = export
        self.decoder = self._parallel_decoder(kwargs.get("device_map"))

    @staticmethod
    def _parallel_decoder(device_map):
        """The load's [`ParallelDecoder`]: with worker threads when weights are decoded on the CPU, nothing reads
        them before `postprocess_model` (no disk offload or multi-device dispatch) and torch may use more than one
        thread; else in line (0 workers)."""
        from .codecs import _workers
        from .decoding import ParallelDecoder

        devices = set(map(str, (device_map or {}).values())) if isinstance(device_map, dict) else {str(device_map)}
        return ParallelDecoder(_workers() if _workers() >= 2 and devices <= {"cpu", "None"} else 0)

    def postprocess_model(self, model, **kwargs):
        decoder, self.decoder = self.decoder, None
        if decoder is not None:
            decoder.join()  # every decoded weight is filled before anyone reads it
        export = getattr(self, "_export", None)
        if export is not None and export.export_id is not None:
            # transformers opened the files again to load them: if they still carry the export id of config.json,
            # no other save replaced the export in between (ids are never reused), so every tensor came from it.
            from .integrity import check_export_id
            from .reading import SafetensorsFile

            for file in export.files:
                with SafetensorsFile(file) as f:
                    check_export_id(f, export.export_id)
            self._export = None
        model.config.quantization_config = self.quantization_config
        conversions = getattr(model, "_weight_conversions", None) or []
        model._weight_conversions = [
            c for c in conversions if not any(isinstance(op, HfPruneDecompress) for op in getattr(c, "operations", ()))
        ]
        self.export_format.finalize_model(model, self.quantization_config)
        enable_compressed_save, = _enable_save  # registered by save.py, imported with `hf_prune.export`
        enable_compressed_save(model, quantizer=self)
        return model

    def param_needs_quantization(self, model, param_name: str, **kwargs) -> bool:
        return False

    # --------------------------------------------------------------------------------------------- saving
    def get_state_dict_and_metadata(self, model):
        from .integrity import checksum_metadata

        state_dict, self.last_report = compressed_state_dict(model, self.quantization_config)
        # transformers' own writer (a direct `PreTrainedModel.save_pretrained(model, ...)`) writes no manifest and
        # no export id: what it writes is format version 2.
        self.quantization_config.format_version, self.quantization_config.export_id = 2, None
        metadata = {"hf_prune_format": self.quantization_config.format, "hf_prune_version": __version__}
        return state_dict, {**metadata, **checksum_metadata(state_dict)}

    def _dequantize(self, model, dtype=None):
        # Weights are dense in memory already; `dequantize()` only drops the compressed-save behaviour.
        disable_compressed_save(model)
        return model

    def is_serializable(self):
        return True

    @property
    def is_trainable(self) -> bool:
        return True

    @property
    def is_compileable(self) -> bool:
        return True


# Registration is idempotent so that re-importing (e.g. importlib.reload in tests) does not raise.
if AUTO_QUANTIZATION_CONFIG_MAPPING.get(QUANT_METHOD) is not HfPruneExportConfig:
    AUTO_QUANTIZATION_CONFIG_MAPPING.pop(QUANT_METHOD, None)
    register_quantization_config(QUANT_METHOD)(HfPruneExportConfig)
if AUTO_QUANTIZER_MAPPING.get(QUANT_METHOD) is not HfPruneQuantizer:
    AUTO_QUANTIZER_MAPPING.pop(QUANT_METHOD, None)
    register_quantizer(QUANT_METHOD)(HfPruneQuantizer)
