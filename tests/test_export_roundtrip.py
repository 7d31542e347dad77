"""Round trips: prune tiny LLaMA / OPT / BERT, save_pretrained, from_pretrained in a fresh process (after
`import hf_prune`): bit-equal weights, equal logits, sizes within bounds, an ordinary model, re-save still compressed."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from export_utils import prune, run_python, sample_inputs, tiny_model

ARCHS = ["llama", "opt", "bert"]
LAYOUTS = [("unstructured", 0.5), ("2:4", 0.5), ("block:16x16", 0.5)]
CASES = [(a, layout, s) for a in ARCHS for layout, s in LAYOUTS]

LOADER = r"""
import json, sys, torch
import hf_prune
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from export_utils import sample_inputs
cases = json.loads(CASES_JSON)
report = {}
for case in cases:
    path, arch = case["path"], case["arch"]
    cls = AutoModelForSequenceClassification if arch == "bert" else AutoModelForCausalLM
    model = cls.from_pretrained(path)
    with torch.no_grad():
        logits = model(**sample_inputs(arch)).logits
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file({**{"sd." + k: v for k, v in sd.items() if not k.endswith("lm_head.weight")}, "logits": logits}, path + ".loaded.safetensors")
    linear = model.get_submodule(case["module"])
    info = {"linear_type": type(linear).__name__, "is_quantized": bool(getattr(model, "is_quantized", False)),
            "state": type(getattr(model, "hf_prune_state", None)).__name__}
    model.save_pretrained(path + "-resave")
    f32 = cls.from_pretrained(path, dtype=torch.float32, device_map="cpu")
    info["f32_equal"] = all(torch.equal(f32.state_dict()[k], v.float()) for k, v in sd.items() if v.is_floating_point())
    info["half_dtype"] = str(model.half().dtype)
    report[path] = info
print("REPORT" + json.dumps(report))
"""


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    root = tmp_path_factory.mktemp("exports")
    out = {}
    for arch, layout, sparsity in CASES:
        model = prune(tiny_model(arch), layout, sparsity)
        path = root / f"{arch}-{layout.replace(':', '_')}"
        model.save_pretrained(path)
        with torch.no_grad():
            logits = model(**sample_inputs(arch)).logits
        module = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".0." in n)
        out[(arch, layout)] = {"path": str(path), "arch": arch, "model": model, "logits": logits, "module": module}
    cases = [{k: v[k] for k in ("path", "arch", "module")} for v in out.values()]
    proc = run_python(LOADER.replace("CASES_JSON", repr(json.dumps(cases))), timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(proc.stdout.split("REPORT", 1)[1])
    for v in out.values():
        v["report"] = report[v["path"]]
    return out


@pytest.mark.parametrize("arch,layout", [(a, layout) for a, layout, _ in CASES])
def test_weights_and_logits_equal_after_from_pretrained(exports, arch, layout):
    e = exports[(arch, layout)]
    loaded = load_file(e["path"] + ".loaded.safetensors")
    sd = e["model"].state_dict()
    keys = [k for k in loaded if k.startswith("sd.")]
    assert len(keys) >= len([k for k in sd if not k.endswith("lm_head.weight")]) - 1
    for k in keys:
        assert torch.equal(loaded[k], sd[k[3:]]), k
    assert torch.equal(loaded["logits"], e["logits"])


@pytest.mark.parametrize("arch,layout", [(a, layout) for a, layout, _ in CASES])
def test_loaded_model_is_ordinary_and_resave_is_compressed(exports, arch, layout):
    e = exports[(arch, layout)]
    r = e["report"]
    assert r["linear_type"] == "Linear" and not r["is_quantized"]
    assert r["state"] == "PruningState"  # the pruning record survives the round trip (same card on re-save)
    assert r["f32_equal"] and r["half_dtype"] == "torch.float16"
    codec = {"unstructured": "bitmask", "2:4": "nm", "block:16x16": "blockmask"}[layout]
    for path in (e["path"], e["path"] + "-resave"):
        with safe_open(f"{path}/model.safetensors", "pt") as f:
            keys = list(f.keys())
            assert any(k.endswith(f"_hf_prune_{codec}") for k in keys), path
        config = json.load(open(f"{path}/config.json"))
        assert config["quantization_config"]["quant_method"] == "hf_prune"
    a, b = load_file(f"{e['path']}/model.safetensors"), load_file(f"{e['path']}-resave/model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _linear_ratio(path):
    """On-disk bytes of the compressed Linear weights (values + index + meta) over their dense fp16 bytes."""
    stored = dense = 0
    with safe_open(f"{path}/model.safetensors", "pt") as f:
        for k in f.keys():
            if k.endswith("_hf_prune_meta"):
                base = k[: -len("_hf_prune_meta")]
                rows, cols = f.get_tensor(k).tolist()[:2]
                dense += rows * cols * 2
                stored += sum(f.get_tensor(x).numel() * f.get_tensor(x).element_size() for x in f.keys() if x.startswith(base))
    return stored / dense


@pytest.mark.parametrize("layout,sparsity,bound", [("unstructured", 0.5, 0.57), ("2:4", 0.5, 0.57), ("unstructured", 0.7, 0.37), ("block:16x16", 0.5, 0.51)])
def test_sizes_within_bounds(tmp_path, layout, sparsity, bound):
    model = prune(tiny_model("llama"), layout, sparsity)
    model.save_pretrained(tmp_path / "m")
    ratio = _linear_ratio(tmp_path / "m")
    assert ratio <= bound, ratio
    if layout == "2:4":
        model2 = prune(tiny_model("llama"), "unstructured", 0.5)
        model2.save_pretrained(tmp_path / "u")
        assert ratio < _linear_ratio(tmp_path / "u")
