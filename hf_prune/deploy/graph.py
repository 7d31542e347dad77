"""The `torch.onnx` export of a (pruned) transformers model, with optimum's input and output names.

Encoders (text-classification, fill-mask): `input_ids`, `attention_mask`, `token_type_ids` -> `logits`. Decoders
(text-generation): `input_ids`, `attention_mask` (past + current), `position_ids`, `past_key_values.{i}.key/value`
-> `logits`, `present.{i}.key/value`, one graph for the prompt (a zero-length past) and every later step, as
optimum's merged decoders. Batch and sequence axes are dynamic. A structurally pruned model exports as it is
(heterogeneous layers, removed sublayers): the graph is traced from its modules, and the cache shapes are read per
layer from a real forward, not from the config.

The TorchScript exporter (`dynamo=False`) is used: it traces transformers 5's attention-mask code and `DynamicCache`
as they run, is fast, and needs no extra package; `export_onnx` checks every graph against PyTorch afterwards.
"""

from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache

from hf_prune_ort import PAST_PREFIX, PRESENT_PREFIX

from .tasks import Task

DEFAULT_OPSET = 17  # LayerNormalization is a single op from 17; ONNX Runtime fuses the rest either way
EXTERNAL_DATA_BYTES = 1 << 30  # above this the weights go to `model.onnx_data` (protobuf's limit is 2 GB)
TRACE_BATCH, TRACE_SEQ, TRACE_PAST = 2, 7, 5  # shapes traced with; the check runs at other shapes


class _EncoderLogits(nn.Module):
    """`model(...).logits` with positional inputs, for the tracer."""

    def __init__(self, model: nn.Module, input_names: list[str]):
        super().__init__()
        self.model, self.input_names = model, input_names

    def forward(self, *inputs):
        return self.model(**dict(zip(self.input_names, inputs))).logits


class _DecoderWithCache(nn.Module):
    """`model(...)` with the cache as flat tensors in and out: (key, value) per layer, as optimum lays it out."""

    def __init__(self, model: nn.Module, num_layers: int):
        super().__init__()
        self.model, self.num_layers = model, num_layers

    def forward(self, input_ids, attention_mask, position_ids, *past):
        cache = DynamicCache(config=self.model.config)
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         use_cache=True, **cache_kwargs(self.model, cache))
        present = []
        for layer in cache_layers(output_cache(out)):
            present += [layer[0], layer[1]]
        return (out.logits, *present)


def cache_kwargs(model: nn.Module, cache) -> dict:
    """The cache argument: `cache` from transformers 5.24 (which deprecates `past_key_values`), else the old name."""
    return {"cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values": cache}


def output_cache(output):
    return output["cache"] if "cache" in output else output["past_key_values"]


def cache_layers(cache) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (key, value) of a transformers `Cache` (`[batch, kv_heads, seq, head_dim]` each)."""
    return [(layer.keys, layer.values) for layer in cache.layers]


def encoder_input_names(model: nn.Module) -> list[str]:
    accepted = inspect.signature(type(model).forward).parameters  # the class: a wrapped instance forward hides it
    return [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in accepted]


def decoder_io(num_layers: int) -> tuple[list[str], list[str]]:
    past = [f"{PAST_PREFIX}{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    present = [f"{PRESENT_PREFIX}{i}.{kind}" for i in range(num_layers) for kind in ("key", "value")]
    return ["input_ids", "attention_mask", "position_ids", *past], ["logits", *present]


def _trace_ids(model: nn.Module, batch: int, seq: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator)


def export_graph(model: nn.Module, task: Task, path: str | Path, opset: int = DEFAULT_OPSET) -> dict:
    """Writes `model` (fp32, eval) as ONNX to `path`; returns the input / output names of the graph."""
    path = Path(path)
    model = model.eval()
    with torch.no_grad():
        if task.decoder:
            ids = _trace_ids(model, TRACE_BATCH, TRACE_PAST + TRACE_SEQ)
            prefix = output_cache(model(input_ids=ids[:, :TRACE_PAST], use_cache=True))  # real cache, real shapes
            past = [t for layer in cache_layers(prefix) for t in layer]
            num_layers = len(past) // 2
            input_names, output_names = decoder_io(num_layers)
            mask = torch.ones_like(ids)
            mask[1, :2] = 0  # a left-padded row, so the mask path is traced
            positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, TRACE_PAST:]
            wrapper = _DecoderWithCache(model, num_layers)
            args = (ids[:, TRACE_PAST:], mask, positions, *past)
            axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
                    "attention_mask": {0: "batch_size", 1: "past_sequence_length + sequence_length"},
                    "position_ids": {0: "batch_size", 1: "sequence_length"},
                    "logits": {0: "batch_size", 1: "sequence_length"}}
            axes.update({n: {0: "batch_size", 2: "past_sequence_length"} for n in input_names[3:]})
            axes.update({n: {0: "batch_size", 2: "past_sequence_length + sequence_length"} for n in output_names[1:]})
        else:
            input_names, output_names = encoder_input_names(model), ["logits"]
            ids = _trace_ids(model, TRACE_BATCH, TRACE_SEQ)
            values = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "token_type_ids": torch.zeros_like(ids)}
            values["attention_mask"][1, TRACE_SEQ // 2:] = 0  # a padded row, so the mask path is traced
            wrapper = _EncoderLogits(model, input_names)
            args = tuple(values[n] for n in input_names)
            axes = {n: {0: "batch_size", 1: "sequence_length"} for n in input_names}
            axes["logits"] = {0: "batch_size"} if task.name == "text-classification" else \
                {0: "batch_size", 1: "sequence_length"}
        wrapper.eval()  # the exporter restores the wrapper's mode afterwards, recursively: a fresh module is training
        with warnings.catch_warnings():  # the tracer's notes on Python-side shape checks; the check after is the judge
            warnings.simplefilter("ignore")
            torch.onnx.export(wrapper, args, str(path), input_names=input_names, output_names=output_names,
                              dynamic_axes=axes, opset_version=opset, dynamo=False, do_constant_folding=True)
    return {"inputs": input_names, "outputs": output_names}


def share_tied_weights(source: Path, target: Path, external_data: str | None = None) -> list[str]:
    """Writes `source` to `target` with each weight that is stored twice stored once; returns the names dropped.
    With `external_data`, the weights go to that file beside `target` (optimum's `model.onnx_data` layout).

    A tied `lm_head` is the embedding matrix, but the exporter folds its transpose into a second initializer for
    the MatMul, so the file holds the matrix twice (108 of SmolLM2-135M's 622 MiB). A MatMul / Gemm weight that is
    bit for bit the transpose of another initializer becomes a `Transpose` node of that one, which ONNX Runtime
    folds back into a constant when the session is created: the file shrinks, the computation is the same (the
    check after the export confirms it). Written here because optimum's graph transformations, which do this for
    optimum's exports, do not install beside transformers 5.
    """
    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(source))
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    by_shape: dict[tuple, list[str]] = {}
    for name, init in initializers.items():
        if len(init.dims) == 2:
            by_shape.setdefault((tuple(init.dims), init.data_type), []).append(name)
    weights = {node.input[1] for node in graph.node if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1}
    replaced: dict[str, str] = {}
    arrays: dict[str, np.ndarray] = {}

    def array(name: str) -> np.ndarray:
        if name not in arrays:
            arrays[name] = numpy_helper.to_array(initializers[name])  # onnx.load read any external data
        return arrays[name]

    for name in sorted(weights & initializers.keys()):
        init = initializers[name]
        if len(init.dims) != 2 or init.dims[0] == init.dims[1]:
            continue
        for other in by_shape.get(((init.dims[1], init.dims[0]), init.data_type), []):
            if other not in replaced and np.array_equal(array(name), array(other).T):
                replaced[name] = other
                break
    if replaced:
        kept = [init for init in graph.initializer if init.name not in replaced]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        transposes = [helper.make_node("Transpose", [other], [name], perm=[1, 0], name=f"{name}_tied_transpose")
                      for name, other in replaced.items()]
        nodes = transposes + list(graph.node)  # first: their inputs are initializers, their outputs keep the names
        del graph.node[:]
        graph.node.extend(nodes)
    if external_data is None:
        onnx.save_model(model, str(target))
    else:
        onnx.save_model(model, str(target), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=external_data, size_threshold=1024)
    return sorted(replaced)
