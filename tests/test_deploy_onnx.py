"""ONNX deployment: every kind of hf_prune checkpoint -> `export_onnx` -> ONNX Runtime computes what PyTorch does."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSequenceClassification

import hf_prune
from hf_prune import CoFiConfig, DynSparseConfig, MagnitudeConfig, attach, oneshot
from hf_prune.cli import main as cli_main
from hf_prune.deploy import ExportVerificationError, export_onnx
from hf_prune.methods.cofi.plugin import CoFiPlugin
from hf_prune.methods.cofi.structure import describe_structure
from hf_prune_ort import OnnxModel

import cofi_helpers
from conftest import tiny_llama, tiny_tokenizer
from export_utils import REPO_ROOT

pytest.importorskip("onnxruntime")


def _ids(vocab: int, batch: int, seq: int, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def cofi_dir(tmp_path_factory):
    """A CoFi export whose layers all differ: 1 head left, attention removed, 8 neurons, a layer with nothing left."""
    model = cofi_helpers.tiny_bert(0).eval()
    plugin = CoFiPlugin(CoFiConfig(multiple_of=1), model)
    with torch.no_grad():
        g = plugin.gates.gates
        for gate in g.values():
            gate.log_alpha.fill_(5.0)
        g["head"].log_alpha[0, :3] = -9.0  # layer 0 keeps one head
        g["mha"].log_alpha[1] = -9.0  # layer 1: attention removed
        g["neuron"].log_alpha[2, :40] = -9.0  # layer 2 keeps 8 neurons
        g["mha"].log_alpha[3] = g["ffn"].log_alpha[3] = -9.0  # layer 3: nothing left
        g["hidden"].log_alpha[:4] = -9.0
        small = plugin.export(model)
    layers = describe_structure(small)["layers"]
    assert [layer["heads"] for layer in layers] == [1, 0, 4, 0]
    assert [layer["intermediate_size"] for layer in layers] == [48, 48, 8, 0]
    out = tmp_path_factory.mktemp("cofi") / "cofi"
    hf_prune.save_pruned(small, out)
    return out


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """A one-shot 50 % sparse tiny LLaMA, saved compressed, with a tokenizer."""
    torch.manual_seed(0)
    model = tiny_llama().eval()
    oneshot(model, MagnitudeConfig(sparsity=0.5), show_progress=False)
    out = tmp_path_factory.mktemp("llama") / "llama"
    model.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


def test_cofi_heterogeneous_export_matches_pytorch(cofi_dir, tmp_path):
    out = tmp_path / "onnx"
    report = export_onnx(cofi_dir, out)
    assert report.task == "text-classification" and report.verification["max_abs_logit_diff"] <= 1e-4
    assert {"model.onnx", "config.json", "README.md"} <= set(os.listdir(out))
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["architectures"] == ["BertForSequenceClassification"]
    card = (out / "README.md").read_text()
    assert "## ONNX export" in card and "cofi" in card and "max abs logit difference" in card
    reference = AutoModelForSequenceClassification.from_pretrained(cofi_dir).eval()
    onnx = OnnxModel.from_pretrained(out, threads=1)
    for batch, seq in ((1, 5), (4, 19)):  # neither is the traced shape
        ids = _ids(64, batch, seq)
        mask = torch.ones_like(ids)
        mask[-1, seq // 2:] = 0
        with torch.no_grad():
            expected = reference(input_ids=ids, attention_mask=mask).logits.numpy()
        got = onnx(ids.numpy(), attention_mask=mask.numpy()).logits
        assert got.shape == (batch, 2)
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_sparse_llama_kv_cache_greedy_equals_generate(llama_dir, tmp_path):
    out = tmp_path / "onnx"
    report = export_onnx(llama_dir, out)
    assert report.task == "text-generation"
    assert report.verification["max_abs_logit_diff"] <= 1e-4 and report.verification["max_abs_cache_diff"] <= 1e-4
    onnx = OnnxModel.from_pretrained(out)
    names = list(onnx.inputs)
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"]
    assert names[3:] == [f"past_key_values.{i}.{k}" for i in range(2) for k in ("key", "value")]
    assert onnx.output_names == ["logits"] + [f"present.{i}.{k}" for i in range(2) for k in ("key", "value")]
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    assert float((model.model.layers[0].mlp.up_proj.weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    ids = _ids(128, 2, 9)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False)
    got = onnx.generate(ids.numpy(), attention_mask=mask.numpy(), max_new_tokens=12)
    assert got.tolist() == expected.tolist()
    # the cache is used: a step feeds one token and returns a cache one longer
    first = onnx(ids.numpy()[:1])
    step = onnx(got[:1, 9:10], attention_mask=np.ones((1, 10)), past_key_values=first.past_key_values)
    assert step.logits.shape == (1, 1, 128) and step.past_key_values[0][0].shape[2] == 10


def _copies(path, matrix: torch.Tensor) -> int:
    """How many initializers of the graph at `path` hold `matrix` or its transpose."""
    import onnx
    from onnx import numpy_helper

    matrix = matrix.detach().numpy()
    arrays = [numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer]
    return sum(a.shape in (matrix.shape, matrix.T.shape) and (np.array_equal(a, matrix) or np.array_equal(a, matrix.T))
               for a in arrays)


def test_tied_embedding_is_stored_once_and_int8_still_quantizes_the_head(llama_dir, tmp_path):
    """The exporter writes a tied LM head as a second (transposed) copy of the embedding; the export keeps one copy
    (a Transpose node feeds the head) with the same outputs. An untied model keeps both of its matrices."""
    import onnx

    untied = AutoModelForCausalLM.from_pretrained(llama_dir)
    untied_graph = export_onnx(llama_dir, tmp_path / "untied").path / "model.onnx"
    assert _copies(untied_graph, untied.model.embed_tokens.weight) == _copies(untied_graph, untied.lm_head.weight) == 1
    torch.manual_seed(0)
    tied = AutoModelForCausalLM.from_config(tiny_llama().config.__class__(
        **{**tiny_llama().config.to_dict(), "tie_word_embeddings": True})).eval()
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    report = export_onnx(tied, tmp_path / "tied", int8=True, tokenizer=tiny_tokenizer())
    graph = tmp_path / "tied" / "model.onnx"
    from hf_prune.deploy.graph import export_graph
    from hf_prune.deploy.tasks import TASKS

    export_graph(tied, TASKS["text-generation"], tmp_path / "traced.onnx")
    assert _copies(tmp_path / "traced.onnx", tied.lm_head.weight) == 2  # what the exporter writes
    assert _copies(graph, tied.lm_head.weight) == 1
    ops = [n.op_type for n in onnx.load(str(graph)).graph.node]
    assert ops.count("Transpose") >= 1 and report.verification["max_abs_logit_diff"] <= 1e-4
    saved = (tmp_path / "traced.onnx").stat().st_size - graph.stat().st_size
    assert abs(saved - 128 * 64 * 4) < 512  # one 32 KB matrix less (less the Transpose node's few bytes)
    assert not (tmp_path / "tied" / ".traced").exists() and ".traced" not in report.files
    quantized = [n.op_type for n in onnx.load(str(tmp_path / "tied" / "model_quantized.onnx")).graph.node]
    assert quantized.count("MatMulNBits") == 2 * 7 + 1  # the LM head too (decoders: blockwise int8)
    onnx_model = OnnxModel.from_pretrained(tmp_path / "tied")
    ids = _ids(128, 2, 6)
    expected = tied.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert onnx_model.generate(ids.numpy(), max_new_tokens=8).tolist() == expected.tolist()


def test_int8_from_the_cli_agrees_on_most_predictions(llama_dir, tmp_path, capsys):
    out = tmp_path / "int8"
    assert cli_main(["export-onnx", str(llama_dir), str(out), "--int8"]) == 0
    printed = capsys.readouterr().out
    assert "argmax agreement" in printed and "model_quantized.onnx" in printed
    import onnx

    ops = [n.op_type for n in onnx.load(str(out / "model_quantized.onnx")).graph.node]
    assert ops.count("MatMulNBits") == 2 * 7 + 1  # every Linear (7 per layer, the LM head); attention stays fp32
    assert (out / "model_quantized.onnx").stat().st_size < 0.7 * (out / "model.onnx").stat().st_size
    assert "blockwise int8" in printed and "MatMulNBitsQuantizer" in (out / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    int8 = OnnxModel.from_pretrained(out, "model_quantized.onnx")
    ids = _ids(128, 4, 16, seed=5)
    with torch.no_grad():
        expected = model(input_ids=ids).logits.argmax(-1).numpy()
    got = int8(ids.numpy()).logits.argmax(-1)
    assert (got == expected).mean() >= 0.8


def test_dynsparse_bert_fill_mask_export(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=96, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64, max_position_embeddings=32))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    pruner = attach(model, DynSparseConfig(sparsity=0.75, block_size=4, num_updates=1), optimizer=opt, total_steps=2)
    for step in range(2):
        ids = _ids(96, 4, 12, seed=step)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step(), pruner.step(), opt.zero_grad()
    model = pruner.finalize().eval()
    model.save_pretrained(tmp_path / "dyn")
    report = export_onnx(tmp_path / "dyn", tmp_path / "onnx")
    assert report.task == "fill-mask" and report.verification["max_abs_logit_diff"] <= 1e-4
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / "dyn").eval()
    ids = _ids(96, 2, 10)
    with torch.no_grad():
        expected = loaded(input_ids=ids).logits.numpy()
    got = OnnxModel.from_pretrained(tmp_path / "onnx")(ids.numpy()).logits
    assert got.shape == (2, 10, 96)
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)


def test_in_memory_model_is_exported_and_left_as_it_was(tmp_path):
    model = cofi_helpers.tiny_bert(1).half().train()
    report = export_onnx(model, tmp_path / "onnx")
    assert report.verification["max_abs_logit_diff"] <= 1e-4
    assert model.training and next(model.parameters()).dtype == torch.float16


def test_session_runs_in_a_process_without_torch(llama_dir, tmp_path):
    out = tmp_path / "onnx"
    export_onnx(llama_dir, out)
    ids = _ids(128, 1, 6)
    expected = AutoModelForCausalLM.from_pretrained(llama_dir).generate(ids, max_new_tokens=8, do_sample=False)
    script = (
        "import json, sys\n"
        "from hf_prune_ort import OnnxModel\n"
        f"model = OnnxModel.from_pretrained({str(out)!r})\n"
        f"tokens = model.generate({ids.tolist()}, max_new_tokens=8)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(json.dumps(tokens.tolist()))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == expected.tolist()


def _untouched(path):
    return sorted((p.name, p.read_bytes()) for p in path.iterdir())


def test_bad_inputs_fail_before_any_work(cofi_dir, llama_dir, tmp_path, monkeypatch):
    import hf_prune.deploy.export as export_module

    def no_load(*args, **kwargs):
        raise AssertionError("the export started before the inputs were checked")

    monkeypatch.setattr(export_module, "export_graph", no_load)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="is not a model directory: it has no config.json"):
        export_onnx(empty, tmp_path / "o")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        export_onnx(tmp_path / "missing", tmp_path / "o")
    with pytest.raises(ValueError, match="task 'text-generation' does not fit .*BertForSequenceClassification.*"
                                         "'text-classification'"):
        export_onnx(cofi_dir, tmp_path / "o", task="text-generation")
    with pytest.raises(ValueError, match="task 'fill-mask' does not fit"):
        export_onnx(llama_dir, tmp_path / "o", task="fill-mask")
    with pytest.raises(ValueError, match="task 'translation' is not supported; choose from auto, "):
        export_onnx(llama_dir, tmp_path / "o", task="translation")
    with pytest.raises(ValueError, match=r"opset 99 cannot run in ONNX Runtime .* runs opsets up to \d+"):
        export_onnx(llama_dir, tmp_path / "o", opset=99)
    with pytest.raises(ValueError, match="opset 11 is not supported: .* writes opsets 14 to"):
        export_onnx(llama_dir, tmp_path / "o", opset=11)
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="already holds .*; pass overwrite=True"):
        export_onnx(llama_dir, existing)
    assert _untouched(existing) == [("keep.txt", b"mine")]
    assert not (tmp_path / "o").exists()
    # the CLI prints the same errors and exits 2
    assert cli_main(["export-onnx", str(empty), str(tmp_path / "o")]) == 2
    assert cli_main(["export-onnx", str(llama_dir), str(existing), "--opset", "99"]) == 2
    # an ONNX export directory is not a source
    monkeypatch.undo()
    export_onnx(llama_dir, tmp_path / "onnx")
    with pytest.raises(FileNotFoundError, match=r"no \*\.safetensors weights \(it holds an ONNX export\)"):
        export_onnx(tmp_path / "onnx", tmp_path / "o")


def test_failed_check_writes_nothing_and_keeps_the_old_export(llama_dir, tmp_path, monkeypatch):
    import hf_prune.deploy.export as export_module

    out = tmp_path / "onnx"
    export_onnx(llama_dir, out)
    before = _untouched(out)
    monkeypatch.setattr(export_module, "compare", lambda *a, **k: {"max_abs_logit_diff": 0.5, "max_abs_logit": 9.0,
                                                                  "argmax_agreement": 0.1, "positions": 1})
    with pytest.raises(ExportVerificationError, match=r"differ from PyTorch's by 5.00e-01 .*nothing was written"):
        export_onnx(llama_dir, out, overwrite=True)
    assert _untouched(out) == before
    assert [p.name for p in tmp_path.iterdir()] == ["onnx"]  # no temporary directory left behind
    monkeypatch.undo()
    report = export_onnx(llama_dir, out, overwrite=True, int8=True)  # a passing export replaces it
    assert "model_quantized.onnx" in report.files and (out / "model_quantized.onnx").is_file()


def test_tolerance_grows_with_the_logits_and_refuses_a_wrong_weight(tmp_path, monkeypatch):
    """Logits of size ~20 (as SmolLM2's): the limit is atol + rtol * max |logit|; a wrong weight is still refused."""
    import copy

    import hf_prune.deploy.export as export_module

    torch.manual_seed(0)
    dense = tiny_llama().eval()
    with torch.no_grad():
        dense.lm_head.weight.mul_(40)
    model = copy.deepcopy(dense)
    oneshot(model, MagnitudeConfig(sparsity=0.5), show_progress=False)
    report = export_onnx(model, tmp_path / "ok", tokenizer=tiny_tokenizer())
    v = report.verification
    assert v["max_abs_logit"] > 10
    assert report.logit_tolerance == pytest.approx(1e-4 + 1e-5 * v["max_abs_logit"])
    assert v["max_abs_logit_diff"] <= report.logit_tolerance
    assert "= 0.0001 + 1e-05 x max |logit|" in (tmp_path / "ok" / "README.md").read_text()
    with pytest.raises(ExportVerificationError, match=r"limit 1\.00e-09 = atol 1e-09 \+ rtol 0 x max"):
        export_onnx(model, tmp_path / "strict", tokenizer=tiny_tokenizer(), atol=1e-9, rtol=0)

    real_export = export_module.export_graph

    def exported_with(change):
        def export_graph(m, *args):
            wrong = copy.deepcopy(m)
            with torch.no_grad():
                change(wrong.model.layers[1].mlp.down_proj.weight)
            return real_export(wrong, *args)
        return export_graph

    def one_weight_off(w):
        w[3, 5] += 0.01  # weights are ~0.02 in size

    def mask_lost(w):
        w.copy_(dense.model.layers[1].mlp.down_proj.weight)  # one layer exported dense

    for change in (one_weight_off, mask_lost):
        monkeypatch.setattr(export_module, "export_graph", exported_with(change))
        with pytest.raises(ExportVerificationError, match=r"differ from PyTorch's by \d\.\d\de-0[0-3] \(limit 2\.\d\de-04"):
            export_onnx(model, tmp_path / "bad", tokenizer=tiny_tokenizer())
        assert not (tmp_path / "bad").exists()
    monkeypatch.undo()
    for bad in ({"atol": -1e-4}, {"rtol": float("nan")}, {"atol": "1e-4"}):
        with pytest.raises(ValueError, match=f"{next(iter(bad))} must be a number >= 0"):
            export_onnx(model, tmp_path / "o", **bad)
    assert not (tmp_path / "o").exists()


def test_missing_onnx_names_the_extra():
    script = ("import sys\nsys.modules['onnx'] = None\n"
              "try:\n    import hf_prune.deploy\nexcept ImportError as err:\n    print(err)\n")
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "needs onnx and onnxruntime" in proc.stdout and "pip install 'hf_prune[deploy]'" in proc.stdout


def test_outputs_overlapping_the_source_are_refused_and_modes_follow_the_umask(llama_dir, tmp_path, monkeypatch):
    import shutil
    import stat

    import hf_prune.deploy.export as export_module

    models = tmp_path / "models"
    src = models / "src"
    shutil.copytree(llama_dir, src)
    (src / "onnx").mkdir()
    (src / "onnx" / "model.onnx").write_bytes(b"an earlier export")
    (models / "sibling").mkdir()
    (models / "sibling" / "config.json").write_text("{}")
    link = tmp_path / "link"
    link.symlink_to(src)
    before = {str(p): p.read_bytes() for p in models.rglob("*") if p.is_file()}

    def no_export(*args, **kwargs):
        raise AssertionError("the export started before the output was checked")

    monkeypatch.setattr(export_module, "export_graph", no_export)
    for source, out, relation in [(src, src, "is"), (src, models, "contains"), (src, src / "onnx", "is inside"),
                                  (src, link, "is"), (link, src, "is"), (link, models, "contains")]:
        with pytest.raises(ValueError, match=f"{relation} the source .*writing there would replace the source"):
            export_onnx(source, out, overwrite=True)
    assert cli_main(["export-onnx", str(src), str(src), "--overwrite"]) == 2
    assert cli_main(["export-onnx", str(src), str(models), "--overwrite"]) == 2
    assert {str(p): p.read_bytes() for p in models.rglob("*") if p.is_file()} == before
    monkeypatch.undo()
    previous = os.umask(0o027)
    try:
        export_onnx(src, tmp_path / "onnx")
    finally:
        os.umask(previous)
    out = tmp_path / "onnx"
    assert stat.S_IMODE(out.stat().st_mode) == 0o750  # not mkdtemp's 0700
    for path in out.iterdir():
        assert stat.S_IMODE(path.stat().st_mode) == 0o640, path.name
