"""Helpers for the export tests: tiny models from config, simple pruning by a mask, subprocess runner.

Importable from subprocess scripts too (they put `tests/` on `sys.path`), so the test pruning method is registered
there as well.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from hf_prune import PruningConfig, PruningState, register_pruning_method, set_pruning_state
from hf_prune.config import _METHOD_REGISTRY, check_open_unit_interval

REPO_ROOT = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent

if "test_export_mask" not in _METHOD_REGISTRY:

    @register_pruning_method("test_export_mask")
    @dataclass(kw_only=True)
    class MaskTestConfig(PruningConfig):
        """Test-only method: magnitude masks in a given layout."""

        sparsity: float = 0.5
        layout: str = "unstructured"

        def validate(self):
            check_open_unit_interval(type(self).__name__, "sparsity", self.sparsity)

MaskTestConfig = _METHOD_REGISTRY["test_export_mask"]


def tiny_model(arch: str, dtype=torch.float16, seed: int = 0):
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        BertConfig,
        GPT2Config,
        LlamaConfig,
        OPTConfig,
    )

    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(
            hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=256, max_position_embeddings=64,
        )
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    elif arch == "opt":
        cfg = OPTConfig(
            hidden_size=128, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
            max_position_embeddings=64, word_embed_proj_dim=128, pad_token_id=1, bos_token_id=2, eos_token_id=2,
        )
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    elif arch == "bert":
        cfg = BertConfig(
            hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4, vocab_size=256,
            max_position_embeddings=64, num_labels=3,
        )
        model = AutoModelForSequenceClassification.from_config(cfg, dtype=dtype)
    elif arch == "gpt2":
        cfg = GPT2Config(n_embd=128, n_layer=2, n_head=4, vocab_size=256, n_positions=64, bos_token_id=0, eos_token_id=0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    else:
        raise ValueError(arch)
    return model.eval()


def prunable_modules(model) -> dict[str, torch.nn.Module]:
    from transformers.pytorch_utils import Conv1D

    return {
        name: mod
        for name, mod in model.named_modules()
        if isinstance(mod, (torch.nn.Linear, Conv1D)) and (".layers." in name or ".layer." in name or ".h." in name)
    }


@torch.no_grad()
def mask_weight(w: torch.Tensor, layout: str, sparsity: float) -> torch.Tensor:
    score = w.abs().float()
    if layout == "unstructured":
        k = int(round(sparsity * w.numel()))
        mask = torch.ones(w.numel(), dtype=torch.bool)
        mask[score.flatten().topk(k, largest=False).indices] = False
        return mask.view_as(w)
    if ":" in layout and not layout.startswith("block"):
        n, m = (int(v) for v in layout.split(":"))
        g = score.view(w.shape[0], -1, m)
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.topk(n, -1).indices, True)
        return keep.view_as(w)
    if layout.startswith("block:"):
        r, c = (int(v) for v in layout[6:].split("x"))
        blocks = score.view(w.shape[0] // r, r, w.shape[1] // c, c).sum((1, 3))
        k = int(round(sparsity * blocks.numel()))
        keep = torch.ones(blocks.numel(), dtype=torch.bool)
        keep[blocks.flatten().topk(k, largest=False).indices] = False
        keep = keep.view_as(blocks)
        return keep.repeat_interleave(r, 0).repeat_interleave(c, 1)
    raise ValueError(layout)


@torch.no_grad()
def prune(model, layout: str = "unstructured", sparsity: float = 0.5, *, base_model: str = "tiny-random"):
    module_sparsity = {}
    for name, mod in prunable_modules(model).items():
        mod.weight.mul_(mask_weight(mod.weight, layout, sparsity))
        module_sparsity[name] = float((mod.weight == 0).float().mean())
    layout_name = layout
    set_pruning_state(
        model,
        PruningState(
            config=MaskTestConfig(sparsity=sparsity, layout=layout),
            layout=layout_name,
            module_sparsity=module_sparsity,
            metrics={"wall_time_s": 0.01},
            base_model=base_model,
            command=f"prune(model, layout={layout!r}, sparsity={sparsity})",
        ),
    )
    return model


def sample_inputs(arch: str):
    ids = torch.arange(3, 19).view(2, 8) % 200 + 3
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def run_python(code: str, *, env: dict | None = None, timeout: float = 120, block_hf_prune: bool = False):
    """Runs `code` in a fresh interpreter that imports this worktree's hf_prune (and tests/ helpers)."""
    prelude = f"import sys; sys.path[:0] = [{str(REPO_ROOT)!r}, {str(TESTS_DIR)!r}]\n"
    if block_hf_prune:
        prelude += (
            "class _Block:\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name == 'hf_prune' or name.startswith('hf_prune.'):\n"
            "            raise ModuleNotFoundError(f'No module named {name!r} (hidden by the test)')\n"
            "sys.meta_path.insert(0, _Block())\n"
        )
    full_env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
                "HF_HUB_DISABLE_PROGRESS_BARS": "1", "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "warning",
                **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", prelude + code], capture_output=True, text=True, timeout=timeout, env=full_env,
        cwd=str(REPO_ROOT),
    )


def rewrite_with_checksums(path, tensors: dict) -> None:
    """Rewrites a safetensors file with fresh checksums: a file that is *consistently* wrong (as a buggy writer would
    make it), so that the structural checks behind the checksums are what a test exercises."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from hf_prune.export.integrity import checksum_metadata

    with safe_open(str(path), framework="pt") as f:
        metadata = dict(f.metadata() or {})
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata={**metadata, **checksum_metadata(tensors)})
    manifest = Path(path).parent / "hf_prune_manifest.json"
    if manifest.is_file():  # format version 3: the manifest lists the file's new checksums too
        import json

        data = json.loads(manifest.read_text())
        data["files"][Path(path).name] = json.loads(checksum_metadata(tensors)["hf_prune_checksums"])
        manifest.write_text(json.dumps(data))
