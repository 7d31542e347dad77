"""Run an `hf-prune export-onnx` directory in ONNX Runtime, without PyTorch.

    from hf_prune_ort import OnnxModel          # imports numpy and onnxruntime only (also as hf_prune.OnnxModel)
    model = OnnxModel.from_pretrained("out")     # or file_name="model_quantized.onnx" for the --int8 export
    logits = model(input_ids, attention_mask=mask).logits
    tokens = model.generate(input_ids, max_new_tokens=32)   # greedy, with the KV cache (decoders)

A small helper to check and time an export, not a replacement for optimum's `ORTModelFor*` classes (no sampling,
no beam search, no pipelines). It is its own top-level package because importing anything under `hf_prune` imports
torch, and a serving process should not need it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnxruntime as ort

ONNX_FILE = "model.onnx"
QUANTIZED_FILE = "model_quantized.onnx"  # optimum's name for ORTQuantizer's output
PAST_PREFIX = "past_key_values."
PRESENT_PREFIX = "present."

_NUMPY_TYPES = {"tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
                "tensor(float16)": np.float16, "tensor(bool)": np.bool_}


@dataclass
class OnnxOutput:
    """What a forward returns: `logits`, and for decoders the cache to feed the next step (per layer (key, value))."""

    logits: np.ndarray
    past_key_values: tuple[tuple[np.ndarray, np.ndarray], ...] | None = None
    extra: dict = field(default_factory=dict)

    def __getitem__(self, key):
        return getattr(self, key)


def session_options(threads: int | None = None) -> ort.SessionOptions:
    """CPU session options: `threads` intra-op threads (None: ONNX Runtime's default), all graph optimisations."""
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return opts


class OnnxModel:
    """An `onnxruntime.InferenceSession` over an exported model, fed the inputs its graph declares.

    Args:
        session: the session.
        config: the exported `config.json` as a dict (eos / pad ids for `generate`).
        generation_config: the exported `generation_config.json` as a dict, if any.
    """

    def __init__(self, session: ort.InferenceSession, config: dict | None = None,
                 generation_config: dict | None = None):
        self.session = session
        self.config = config or {}
        self.generation_config = generation_config or {}
        self.inputs = {i.name: i for i in session.get_inputs()}
        self.output_names = [o.name for o in session.get_outputs()]
        self.past_names = [n for n in self.inputs if n.startswith(PAST_PREFIX)]
        self.num_layers = len(self.past_names) // 2

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, file_name: str = ONNX_FILE, *, threads: int | None = None,
                        options: ort.SessionOptions | None = None, providers: list | None = None) -> "OnnxModel":
        """Opens `directory/file_name` (`model.onnx`; `model_quantized.onnx` for an `--int8` export) on the CPU."""
        directory = Path(directory)
        path = directory / file_name
        if not path.is_file():
            found = sorted(p.name for p in directory.glob("*.onnx")) if directory.is_dir() else []
            raise FileNotFoundError(f"no ONNX model {str(path)!r}" + (f"; the directory holds {found}" if found else
                                    " (write one with `hf-prune export-onnx`)"))
        session = ort.InferenceSession(str(path), options or session_options(threads),
                                       providers=providers or ["CPUExecutionProvider"])
        return cls(session, _read_json(directory / "config.json"), _read_json(directory / "generation_config.json"))

    @property
    def is_decoder(self) -> bool:
        return bool(self.past_names)

    def _dtype(self, name: str):
        return _NUMPY_TYPES.get(self.inputs[name].type, np.int64)

    def empty_past(self, batch_size: int) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
        """A zero-length cache, shaped from the graph's declared past inputs (heads and head size can differ per
        layer in a structurally pruned model)."""
        past = []
        for layer in range(self.num_layers):
            pair = []
            for kind in ("key", "value"):
                info = self.inputs[f"{PAST_PREFIX}{layer}.{kind}"]
                _, heads, _, head_dim = info.shape
                pair.append(np.zeros((batch_size, heads, 0, head_dim), dtype=self._dtype(info.name)))
            past.append(tuple(pair))
        return tuple(past)

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, position_ids=None,
                 past_key_values=None) -> OnnxOutput:
        """One forward. Missing optional inputs get transformers' defaults (mask of ones, token types 0, positions
        from the mask); only the inputs the graph declares are fed."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        batch, seq = input_ids.shape
        if self.is_decoder and past_key_values is None:
            past_key_values = self.empty_past(batch)
        past_len = past_key_values[0][0].shape[2] if self.is_decoder and self.num_layers else 0
        if attention_mask is None:
            attention_mask = np.ones((batch, past_len + seq), dtype=np.int64)
        attention_mask = np.asarray(attention_mask)
        if position_ids is None and "position_ids" in self.inputs:
            # transformers' rule (generate): positions count the attended tokens; padded slots get 1
            positions = np.cumsum(attention_mask, axis=-1) - 1
            positions[attention_mask == 0] = 1
            position_ids = positions[:, -seq:]
        values = {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                  "token_type_ids": np.zeros_like(input_ids) if token_type_ids is None else token_type_ids}
        if self.is_decoder:
            for layer, (key, value) in enumerate(past_key_values):
                values[f"{PAST_PREFIX}{layer}.key"], values[f"{PAST_PREFIX}{layer}.value"] = key, value
        feed = {}
        for name in self.inputs:
            if values.get(name) is None:
                raise ValueError(f"the ONNX graph needs input {name!r}")
            feed[name] = np.asarray(values[name], dtype=self._dtype(name))
        outputs = dict(zip(self.output_names, self.session.run(None, feed)))
        present = None
        if self.is_decoder:
            present = tuple((outputs.pop(f"{PRESENT_PREFIX}{i}.key"), outputs.pop(f"{PRESENT_PREFIX}{i}.value"))
                            for i in range(self.num_layers))
        return OnnxOutput(logits=outputs.pop("logits"), past_key_values=present, extra=outputs)

    def _special_ids(self) -> tuple[list[int], int | None]:
        eos = self.generation_config.get("eos_token_id", self.config.get("eos_token_id"))
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        pad = self.generation_config.get("pad_token_id", self.config.get("pad_token_id"))
        return eos, (eos[0] if pad is None and eos else pad)

    def generate(self, input_ids, max_new_tokens: int = 20, attention_mask=None,
                 eos_token_id: int | list[int] | None = None, pad_token_id: int | None = None) -> np.ndarray:
        """Greedy decoding with the KV cache, as `transformers`' `generate(do_sample=False)`: stops at the end-of-
        sequence id(s) (from the exported generation / model config unless given), pads finished rows.

        Returns the prompt and the new tokens, `[batch, prompt + new]` int64.
        """
        if not self.is_decoder:
            raise ValueError("generate() needs a decoder exported with its KV cache (--task text-generation)")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
        eos, pad = self._special_ids()
        if eos_token_id is not None:
            eos = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id)
        pad = pad if pad_token_id is None else pad_token_id
        tokens = np.asarray(input_ids, dtype=np.int64)
        mask = np.ones_like(tokens) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        finished = np.zeros(tokens.shape[0], dtype=bool)
        step_ids, past = tokens, None
        for _ in range(max_new_tokens):
            out = self(step_ids, attention_mask=mask, past_key_values=past)
            nxt = out.logits[:, -1].argmax(-1).astype(np.int64)
            if eos:
                if pad is not None:
                    nxt = np.where(finished, pad, nxt)
                finished |= np.isin(nxt, eos)
            tokens = np.concatenate([tokens, nxt[:, None]], axis=1)
            if eos and finished.all():
                break
            mask = np.concatenate([mask, np.ones((mask.shape[0], 1), dtype=mask.dtype)], axis=1)
            step_ids, past = nxt[:, None], out.past_key_values
        return tokens


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


__all__ = ["OnnxModel", "OnnxOutput", "session_options", "ONNX_FILE", "QUANTIZED_FILE"]
