"""The CoFi benchmark's timing harness on a tiny pruned model: ONNX export equal to PyTorch, every runtime timed."""

import os
import sys

import onnxruntime as ort  # from the [test] extra, as for the benchmark's [bench] extra
import pytest
import torch

from hf_prune import CoFiConfig
from hf_prune.methods.cofi.plugin import CoFiPlugin
from hf_prune.methods.cofi.structure import RemovedAttention, RemovedFFNOutput

from cofi_helpers import tiny_bert

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import cofi_minilm as bench  # noqa: E402


def _pruned_tiny():
    model = tiny_bert(0).eval()
    plugin = CoFiPlugin(CoFiConfig(), model)
    with torch.no_grad():
        g = plugin.gates.gates
        for gate in g.values():
            gate.log_alpha.fill_(5.0)
        g["mha"].log_alpha[1] = -9.0  # layer 1 attention removed
        g["neuron"].log_alpha[3] = -9.0  # layer 3 FFN removed
        g["head"].log_alpha[0, :3] = -9.0
        g["hidden"].log_alpha[:4] = -9.0
    small = plugin.export(model).eval()
    assert isinstance(small.bert.encoder.layer[1].attention, RemovedAttention)
    assert isinstance(small.bert.encoder.layer[3].output, RemovedFFNOutput)
    return small


def test_onnx_export_of_pruned_model_equals_pytorch(tmp_path):
    small = _pruned_tiny()
    exported = bench.export_onnx(small, str(tmp_path / "small"), int8=True)  # hf_prune.export_onnx underneath
    path = exported["fp32"]
    assert exported["report"].verification["max_abs_logit_diff"] < 1e-4 and os.path.isfile(exported["int8"])
    ids = torch.randint(0, 64, (3, 12))  # another batch size and length than the export's: the axes are dynamic
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    with torch.no_grad():
        ref = small(input_ids=ids, attention_mask=mask).logits.numpy()
    session = ort.InferenceSession(path)
    got = session.run(None, bench._feed(session, {"input_ids": ids, "attention_mask": mask}))[0]
    assert abs(got - ref).max() < 1e-4


def test_onnx_export_refuses_a_model_it_gets_wrong(tmp_path, monkeypatch):
    small = _pruned_tiny()
    real = small.forward

    def shifted(*args, **kwargs):  # the PyTorch reference drifts away from what was exported
        out = real(*args, **kwargs)
        if not torch.jit.is_tracing() and not torch.onnx.is_in_onnx_export():
            out.logits = out.logits + 1.0
        return out

    monkeypatch.setattr(small, "forward", shifted)
    with pytest.raises(RuntimeError, match="differ from PyTorch's"):
        bench.export_onnx(small, str(tmp_path / "small"))
    assert not (tmp_path / "small").exists()


@pytest.mark.parametrize("runtime", ["eager", "onnxruntime"])
def test_latencies_times_every_model_at_both_batch_sizes(tmp_path, runtime):
    small = _pruned_tiny()
    teacher = tiny_bert(1).eval()
    models = {"teacher": teacher, "small": small}
    paths = None
    if runtime == "onnxruntime":
        paths = {n: bench.export_onnx(m, str(tmp_path / n))["fp32"] for n, m in models.items()}
    out = bench.latencies(models, 16, threads=1, runtime=runtime, rounds=2, repeats=3, onnx_paths=paths,
                          token_ids=(0, 64))
    assert set(out) == {"teacher", "small"}
    for name in out:
        assert set(out[name]) == {"b1", "b32"}
        assert all(v > 0 for v in out[name].values())


def test_ffn_cell_shows_kept_neurons_where_the_export_padded():
    row = {"ffn_per_layer": [848, 0, 96], "ffn_kept_per_layer": [837, 0, 96]}
    assert bench._ffn_cell(row) == "[848 (837), 0, 96]"
    assert bench._ffn_cell({"ffn_per_layer": [1536, 1536], "ffn_kept_per_layer": None}) == "[1536, 1536]"


def test_floor_model_is_the_teacher_without_sublayers():
    teacher = tiny_bert(1).eval()
    floor = bench.floor_model(teacher)
    assert not any(".encoder." in n for n, _ in floor.named_parameters())
    layers = bench.describe_structure(floor)["layers"]
    assert all(layer["attention_removed"] and layer["ffn_removed"] for layer in layers)
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        hidden = teacher.bert.embeddings(input_ids=ids)  # what the encoder would have passed through unchanged
        expected = teacher.classifier(teacher.bert.pooler(hidden))
        torch.testing.assert_close(floor(input_ids=ids).logits, expected)
    assert teacher.bert.encoder.layer[0].attention.self.query.weight.shape == (32, 32)  # the teacher is untouched
