"""Pruned models survive `pickle`, `copy.deepcopy` and `torch.save(model)` (every method's output, and a model loaded
from a compressed export), and the copy still saves compressed, through its own bound `save_pretrained`."""

import copy
import io
import json
import pickle

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_prune import CoFiConfig, DynSparseConfig, MagnitudeConfig, attach, get_pruning_state, oneshot
from hf_prune.export.info import load_compressed_state_dict
from hf_prune.methods.cofi.plugin import CoFiPlugin

from cofi_helpers import random_gates, tiny_bert
from dynsparse_utils import batch, tiny_llama as dyn_llama
from export_utils import tiny_model


def _oneshot():
    return oneshot(tiny_model("llama", dtype=torch.float32), MagnitudeConfig(sparsity=0.5)), "sparse"


def _cofi():
    plugin = CoFiPlugin(CoFiConfig(target_sparsity=0.5, multiple_of=1), tiny_bert(0))
    random_gates(plugin, 3)
    return plugin.export(plugin.model), "structured"


def _dynsparse():
    model = dyn_llama()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner = attach(model, DynSparseConfig(sparsity=0.75, block_size=16, num_updates=2), optimizer=opt, total_steps=4)
    for step in range(4):
        model(**batch(step)).loss.backward()
        opt.step()
        pruner.step()
        opt.zero_grad()
    return pruner.finalize(), "sparse"


def _loaded(tmp_path):
    model, _ = _oneshot()
    model.save_pretrained(tmp_path / "source")
    return AutoModelForCausalLM.from_pretrained(tmp_path / "source"), "sparse"


def _torch_save(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


ROUND_TRIPS = {
    "pickle": lambda m: pickle.loads(pickle.dumps(m)),
    "deepcopy": copy.deepcopy,
    "torch.save": _torch_save,
}
BUILDERS = {"oneshot": _oneshot, "cofi": _cofi, "dynsparse": _dynsparse, "from_pretrained": _loaded}


def _inputs(model):
    ids = torch.arange(12).reshape(2, 6) % 50 + 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.mark.parametrize("trip", sorted(ROUND_TRIPS))
@pytest.mark.parametrize("method", sorted(BUILDERS))
def test_round_trip_keeps_state_outputs_and_compressed_save(method, trip, tmp_path):
    build = BUILDERS[method]
    model, fmt = build(tmp_path) if method == "from_pretrained" else build()
    model.eval()
    clone = ROUND_TRIPS[trip](model)

    assert clone is not model and type(clone) is type(model)
    # the copy's entry points are bound to the copy, not to the original
    assert clone.save_pretrained.__self__ is clone and clone.push_to_hub.__self__ is clone
    state, cloned_state = get_pruning_state(model), get_pruning_state(clone)
    assert cloned_state is not None and cloned_state.module_sparsity == state.module_sparsity
    assert cloned_state.config.to_dict() == state.config.to_dict()
    with torch.no_grad():
        torch.testing.assert_close(clone(**_inputs(clone)).logits, model(**_inputs(model)).logits, rtol=0, atol=0)

    out = clone.save_pretrained(tmp_path / "copy")
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "hf_prune" and qc["format"] == fmt
    assert (out / "README.md").is_file()
    saved = load_compressed_state_dict(out)
    own = clone.state_dict()
    for key, tensor in saved.items():
        torch.testing.assert_close(tensor, own[key], rtol=0, atol=0)
    if fmt == "sparse":  # the sparse weights are stored compressed (values + index + meta), not dense
        from safetensors import safe_open

        with safe_open(str(out / "model.safetensors"), framework="pt") as f:
            assert any(k.endswith("_hf_prune_meta") for k in f.keys())


def test_signature_and_doc_are_the_wrapped_functions():
    import inspect

    model, _ = _oneshot()
    params = inspect.signature(model.save_pretrained).parameters
    assert "save_directory" in params and "overwrite" in params and "self" not in params
    assert "save_pruned" in model.save_pretrained.__doc__
