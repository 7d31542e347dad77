"""Layers reading the same input share one Gram accumulation and one ADMM factorisation; results are unchanged."""

import copy
import functools
import importlib

import pytest
import torch

from hf_prune import ADMMConfig, SparseGPTConfig, oneshot
from hf_prune.oneshot.blocks import capture_block_inputs, find_blocks
from hf_prune.oneshot.masks import kth_smallest, lowest_k_mask, nm_mask
from hf_prune.oneshot.passes import collect_stats
from hf_prune.oneshot.plan import plan_layers

from conftest import TINY_MODELS

runner = importlib.import_module("hf_prune.oneshot.runner")


def test_llama_groups_qkv_and_gate_up(calibration_ids):
    torch.manual_seed(0)
    model = TINY_MODELS["llama"]()
    blocks = find_blocks(model)
    plan = plan_layers(blocks, ADMMConfig(sparsity=0.5), None)
    inputs = capture_block_inputs(model, blocks, list(calibration_ids.split(2)))
    stats = collect_stats(blocks.layers[0], plan[0], inputs, True)
    by_id = {}
    for name, s in stats.items():
        by_id.setdefault(id(s), []).append(name.rsplit(".", 1)[-1])
    assert sorted(map(sorted, by_id.values())) == [["down_proj"], ["gate_proj", "up_proj"], ["k_proj", "q_proj", "v_proj"], ["o_proj"]]
    separate = collect_stats(blocks.layers[0], plan[0], inputs, True, share_inputs=False)
    assert len({id(s) for s in separate.values()}) == 7
    for name in stats:
        assert torch.equal(stats[name].gram, separate[name].gram), name
        assert stats[name].tokens == separate[name].tokens == calibration_ids.numel()


@pytest.mark.parametrize("arch", ["llama", "opt"])
@pytest.mark.parametrize("config", [ADMMConfig(sparsity=0.6), ADMMConfig(pattern="2:4"), SparseGPTConfig(sparsity=0.5)])
def test_shared_gram_equals_per_layer(arch, config, calibration_ids, monkeypatch):
    torch.manual_seed(0)
    dense = TINY_MODELS[arch]()
    shared = oneshot(copy.deepcopy(dense), config, calibration=calibration_ids, show_progress=False)
    monkeypatch.setattr(runner, "collect_stats", functools.partial(collect_stats, share_inputs=False))
    separate = oneshot(copy.deepcopy(dense), config, calibration=calibration_ids, show_progress=False)
    for (name, a), (_, b) in zip(shared.named_parameters(), separate.named_parameters()):
        assert torch.equal(a == 0, b == 0), name  # same masks
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_kth_smallest_equals_kthvalue():
    gen = torch.Generator().manual_seed(0)
    for n in (100, 70_001, 300_000):
        for values in (torch.randn(n, generator=gen), torch.randint(0, 3, (n,), generator=gen).float()):
            for k in (1, n // 3, n // 2, n - 1, n):
                assert torch.equal(kth_smallest(values, k), values.kthvalue(k).values), (n, k)
    scores = torch.randn(1, 200_000, generator=gen)
    assert int((~lowest_k_mask(scores, 123_457)).sum()) == 123_457


@pytest.mark.parametrize("n, m", [(2, 4), (1, 4), (4, 8), (3, 16)])
def test_nm_mask_keeps_top_n_like_topk(n, m):
    scores = torch.randn(7, m * 5, generator=torch.Generator().manual_seed(1))
    grouped = scores.view(7, 5, m)
    reference = torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, grouped.topk(n, dim=-1).indices, True)
    assert torch.equal(nm_mask(scores, n, m), reference.view(7, -1))
    ties = torch.zeros(3, m * 2)  # all tied: the first n positions of each group are kept
    expected = torch.zeros(3, 2, m, dtype=torch.bool)
    expected[..., :n] = True
    assert torch.equal(nm_mask(ties, n, m), expected.view(3, -1))
