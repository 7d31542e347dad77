"""`export_onnx`: any hf_prune checkpoint (or in-memory model) to an ONNX Runtime directory, checked before written."""

from __future__ import annotations

import copy
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel

from hf_prune_ort import ONNX_FILE, QUANTIZED_FILE, OnnxModel

from ..output_dir import OutputBuild
from .graph import DEFAULT_OPSET, EXTERNAL_DATA_BYTES, export_graph, share_tied_weights
from .opsets import check_opset
from .tasks import TASKS, Task, resolve_task
from .verify import compare, logit_tolerance, sample_inputs

logger = logging.getLogger("hf_prune")

EXTERNAL_DATA_FILE = "model.onnx_data"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "tokenizer.model", "vocab.json")


class ExportVerificationError(RuntimeError):
    """The ONNX graph does not compute what the PyTorch model computes; nothing was written."""


@dataclass
class OnnxExportReport:
    """What `export_onnx` wrote and how well the graphs matched PyTorch."""

    path: Path
    task: str
    opset: int
    inputs: list[str]
    outputs: list[str]
    verification: dict
    atol: float
    rtol: float = 0.0
    logit_tolerance: float | None = None
    int8: dict | None = None
    min_int8_agreement: float | None = None
    int8_scheme: str | None = None
    verified_on: str | None = None
    onnx_file: str = ONNX_FILE
    quantized_file: str | None = None
    external_data: str | None = None
    command: str | None = None
    files: list[str] = field(default_factory=list)

    @property
    def num_layers(self) -> int:
        return sum(n.endswith(".key") for n in self.inputs if n.startswith("past_key_values."))

    @property
    def ort_class(self) -> str:
        return TASKS[self.task].ort_class


def _load_source(model_or_dir, task: str):
    """(model, tokenizer, source dir or None, Task), every check done before the weights are loaded."""
    if isinstance(model_or_dir, torch.nn.Module):
        if not isinstance(model_or_dir, PreTrainedModel):
            raise TypeError(f"export_onnx needs a transformers PreTrainedModel, got {type(model_or_dir).__name__}")
        name = type(model_or_dir).__name__
        return model_or_dir, None, None, resolve_task(task, name, f"the in-memory {name}")
    source = Path(model_or_dir)
    if not source.is_dir():
        raise FileNotFoundError(f"model directory {str(source)!r} does not exist (the Hub is not reached from here)")
    if not (source / "config.json").is_file():
        raise FileNotFoundError(f"{str(source)!r} is not a model directory: it has no config.json")
    if not any(source.glob("*.safetensors")) and not (source / "pytorch_model.bin").is_file():
        onnx = " (it holds an ONNX export)" if (source / ONNX_FILE).is_file() else ""
        raise FileNotFoundError(f"{str(source)!r} is not a model directory: it has no *.safetensors weights{onnx}")
    from transformers import AutoConfig, AutoTokenizer

    import transformers

    config = AutoConfig.from_pretrained(source)
    architectures = getattr(config, "architectures", None) or [None]
    chosen = resolve_task(task, architectures[0], repr(str(source)))
    model = getattr(transformers, chosen.auto_class).from_pretrained(source, dtype=torch.float32)
    tokenizer = None
    if any((source / f).is_file() for f in TOKENIZER_FILES):
        tokenizer = AutoTokenizer.from_pretrained(source)
    return model, tokenizer, source, chosen


def _save_config(model, directory: Path, task: Task) -> None:
    """`config.json` of the model without hf_prune's `quantization_config` (the ONNX weights are plain), and
    `generation_config.json` for decoders (their eos / pad ids)."""
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [type(model).__name__]
    config.save_pretrained(directory)
    if task.decoder and getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)


def _verify(model, path: Path, file_name: str, task: Task, inputs) -> dict:
    onnx = OnnxModel.from_pretrained(path, file_name)
    return compare(model, onnx, task, inputs)


def export_onnx(model_or_dir, out: str | os.PathLike, task: str = "auto", int8: bool = False, opset: int | None = None,
                overwrite: bool = False, *, tokenizer=None, atol: float = 1e-4, rtol: float = 1e-5,
                min_int8_agreement: float = 0.9, int8_scheme: str = "auto",
                command: str | None = None) -> OnnxExportReport:
    """Exports a (pruned) model to ONNX Runtime, checked against PyTorch before anything is written.

    Args:
        model_or_dir: an hf_prune checkpoint directory (CoFi structured, one-shot sparse, DynSparse, or any plain
            transformers checkpoint), or an in-memory `PreTrainedModel` (pruned or not).
        out: output directory, in optimum's layout: `model.onnx` (+ `model.onnx_data` above 1 GB of weights),
            `config.json`, `generation_config.json` (decoders), tokenizer files, `README.md` (the model's card with
            an "ONNX export" section).
        task: `"auto"` (from the architecture), `"text-classification"`, `"fill-mask"` or `"text-generation"`
            (exported with the KV cache: `past_key_values.{i}.key/value` in, `present.{i}.key/value` out).
        int8: also write `model_quantized.onnx`, int8 weight quantization of the checked graph, in settings that
            are right on every CPU ONNX Runtime supports (see `int8_scheme`).
        int8_scheme: `"auto"` (default: `"blockwise"` for text generation, `"dynamic"` otherwise), `"dynamic"`
            (int8 per-channel weights with `reduce_range`, i.e. 7-bit, activations quantized at run time:
            `MatMulInteger`; the fast path for encoders) or `"blockwise"` (8-bit weights with a scale per block of 32
            inputs: `MatMulNBits`; decoders' activation outliers defeat per-tensor activation quantization). Why each,
            in `hf_prune.deploy.quantize`.
        opset: ONNX opset (default 17); it must be one the exporter writes and ONNX Runtime runs.
        overwrite: replace an existing non-empty `out` (its whole content). An `out` that is, contains or is inside
            the source directory is refused (symlinks resolved), with or without `overwrite`.
        tokenizer: the tokenizer to save and to build the check inputs with (default: the directory's, if any).
        atol, rtol: the fp32 graph's max abs logit difference from PyTorch must be at most
            `atol + rtol * max|logit|` (the largest PyTorch logit over the checked positions). fp32 rounding error
            grows with the logits' size, so a fixed 1e-4 only fits logits of size ~1: the real SmolLM2-135M (30
            layers, logits up to ~20) differs by ~1.2e-4 with nothing wrong and passes at the defaults (limit
            ~3e-4), while a wrong weight or cache wiring (differences of 1e-3 and more) is refused.
            `rtol=0` makes `atol` an absolute limit.
        min_int8_agreement: the int8 graph must agree with PyTorch's argmax on at least this fraction of positions.
        command: the command recorded in the card.

    Returns:
        An `OnnxExportReport` (`path`, the check figures in `verification` and `int8`).

    Raises:
        ExportVerificationError: a graph does not match PyTorch; `out` is left as it was.
    """
    out = Path(out)
    for name, value in (("atol", atol), ("rtol", rtol)):
        if not (isinstance(value, (int, float)) and value >= 0):
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    source_dir = None if isinstance(model_or_dir, torch.nn.Module) else model_or_dir
    output = OutputBuild(out, overwrite=overwrite, sources=[source_dir])  # refused here, before any work
    opset = check_opset(DEFAULT_OPSET if opset is None else opset)
    from .quantize import resolve_scheme

    resolve_scheme(int8_scheme, decoder=False)  # a bad name is refused before any work
    model, dir_tokenizer, source, chosen = _load_source(model_or_dir, task)
    tokenizer = tokenizer if tokenizer is not None else dir_tokenizer
    if next(model.parameters()).dtype != torch.float32:
        model = copy.deepcopy(model).float()  # never change the caller's model
    was_training = model.training
    model.eval()
    try:
        with output.building() as tmp:
            logger.info("hf_prune: exporting %s to ONNX (task %s, opset %d)", type(model).__name__, chosen.name, opset)
            traced = tmp / ".traced"  # the exporter's graph; int8 quantizes it (a MatMul fed by a Transpose is not quantized)
            traced.mkdir()
            names = export_graph(model, chosen, traced / ONNX_FILE, opset)
            weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            external = EXTERNAL_DATA_FILE if weight_bytes > EXTERNAL_DATA_BYTES else None
            shared = share_tied_weights(traced / ONNX_FILE, tmp / ONNX_FILE, external)
            if shared:
                logger.info("hf_prune: %d tied weight(s) stored once in the ONNX graph: %s", len(shared), ", ".join(shared))
            inputs = sample_inputs(model, tokenizer, chosen)
            check = _verify(model, tmp, ONNX_FILE, chosen, inputs)
            limit = logit_tolerance(atol, rtol, check["max_abs_logit"])
            logger.info("hf_prune: ONNX vs PyTorch: max abs logit diff %.2e (limit %.2e)", check["max_abs_logit_diff"],
                        limit)
            if not check["max_abs_logit_diff"] <= limit:
                raise ExportVerificationError(
                    f"the ONNX graph's logits differ from PyTorch's by {check['max_abs_logit_diff']:.2e} (limit "
                    f"{limit:.2e} = atol {atol:g} + rtol {rtol:g} x max |logit| {check['max_abs_logit']:.3g}); nothing "
                    f"was written to {str(out)!r}")
            report = OnnxExportReport(path=out, task=chosen.name, opset=opset, inputs=names["inputs"],
                                      outputs=names["outputs"], verification=check, atol=atol, rtol=rtol,
                                      logit_tolerance=limit, external_data=external, command=command)
            if int8:
                from ..cpu import describe_cpu
                from .quantize import quantize_int8

                scheme = resolve_scheme(int8_scheme, chosen.decoder)
                quantize_int8(traced / ONNX_FILE, tmp / QUANTIZED_FILE, scheme)
                q = _verify(model, tmp, QUANTIZED_FILE, chosen, inputs)
                logger.info("hf_prune: int8 (%s) vs PyTorch: argmax agreement %.4f", scheme, q["argmax_agreement"])
                if not q["argmax_agreement"] >= min_int8_agreement:
                    raise ExportVerificationError(
                        f"the int8 graph agrees with PyTorch's argmax on {q['argmax_agreement']:.1%} of positions "
                        f"(limit min_int8_agreement={min_int8_agreement:g}, int8_scheme={scheme!r}); nothing was "
                        f"written to {str(out)!r}")
                report.int8, report.min_int8_agreement, report.quantized_file = q, min_int8_agreement, QUANTIZED_FILE
                report.int8_scheme, report.verified_on = scheme, describe_cpu()
            shutil.rmtree(traced)
            _save_config(model, tmp, chosen)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
            from .card import build_card

            build_card(model, source, report).save(tmp / "README.md")
            report.files = sorted(p.name for p in tmp.iterdir())
    finally:
        model.train(was_training)
    return report
