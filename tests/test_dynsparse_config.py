import math

import pytest

from hf_prune import DynSparseConfig, PruningConfig, attach, sparse_learning_rate
from hf_prune.methods.dynsparse import UpdateSchedule

from dynsparse_utils import tiny_llama


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"sparsity": 0.0}, "sparsity"),
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": 1.5}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"num_updates": 0}, "num_updates"),
        ({"num_updates": -3}, "num_updates"),
        ({"update_interval": 0}, "update_interval"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": [4, 4, 4]}, "block_size"),
        ({"block_metric": "l3"}, "block_metric"),
        ({"pruning_ratio": 0.0}, "pruning_ratio"),
        ({"pruning_ratio": 1.2}, "pruning_ratio"),
        ({"pruning_ratio_decay": "linear"}, "pruning_ratio_decay"),
        ({"regrowth": "magic"}, "regrowth"),
        ({"update_start": 0.8, "update_end": 0.5}, "update_start"),
        ({"num_updates": 4, "update_interval": 10}, "num_updates"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_config_names_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DynSparseConfig(**kwargs)


def test_block_size_not_dividing_weight_names_field_and_module():
    model = tiny_llama()  # k_proj is 32 x 64: 24 divides neither
    with pytest.raises(ValueError, match=r"block_size=24x24 does not divide the weight of 'model\.layers\.0"):
        attach(model, DynSparseConfig(block_size=24), total_steps=10)


def test_round_trip_and_registry(tmp_path):
    config = DynSparseConfig(sparsity=0.8, block_size=[8, 16], num_updates=7, regrowth="gradient")
    config.save_pretrained(tmp_path)
    loaded = PruningConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, DynSparseConfig) and loaded == config
    assert loaded.block_shape == (8, 16) and loaded.layout == "block:8x16"
    assert DynSparseConfig().layout == "unstructured"


def test_paper_default_update_counts():
    assert DynSparseConfig(block_size=1).resolved_num_updates == 160
    assert DynSparseConfig(block_size=16).resolved_num_updates == 80
    assert DynSparseConfig(update_interval=5).resolved_num_updates is None


def test_learning_rate_rule():
    assert sparse_learning_rate(2e-4, 0.0) == pytest.approx(2e-4)
    assert sparse_learning_rate(2e-4, 0.9) == pytest.approx(2e-4 * math.exp(1.969 * 0.81 + 0.2905 * 0.9))
    assert DynSparseConfig(sparsity=0.9).learning_rate(2e-4) == pytest.approx(sparse_learning_rate(2e-4, 0.9))
    with pytest.raises(ValueError, match="sparsity"):
        sparse_learning_rate(1e-3, 1.0)


def test_schedule_steps_and_cosine_values():
    schedule = UpdateSchedule(DynSparseConfig(num_updates=4, pruning_ratio=0.5), total_steps=100)
    assert schedule.update_steps == [20, 40, 60, 80]
    assert schedule.pruning_ratio(0) == pytest.approx(0.5)
    assert schedule.pruning_ratio(50) == pytest.approx(0.25)
    assert schedule.pruning_ratio(100) == pytest.approx(0.0, abs=1e-12)
    assert schedule.pruning_ratio(20) == pytest.approx(0.5 * 0.5 * (1 + math.cos(math.pi * 0.2)))
    constant = UpdateSchedule(DynSparseConfig(num_updates=4, pruning_ratio_decay="constant"), total_steps=100)
    assert all(constant.pruning_ratio(t) == 0.5 for t in (0, 37, 100))
    interval = UpdateSchedule(DynSparseConfig(update_interval=10, update_start=0.2, update_end=0.6), total_steps=100)
    assert interval.update_steps == [30, 40, 50]
    stretch = UpdateSchedule(DynSparseConfig(num_updates=3, update_end=0.5), total_steps=100)
    assert stretch.update_steps == [12, 25, 37]
    with pytest.raises(ValueError, match="total number of optimizer steps"):
        UpdateSchedule(DynSparseConfig(), total_steps=0)
