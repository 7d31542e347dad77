import json

import pytest

import hf_prune
from hf_prune import ADMMConfig, MagnitudeConfig, PruningConfig, SparseGPTConfig, WandaConfig
from hf_prune.config import register_pruning_method
from hf_prune.oneshot import OneShotConfig


@pytest.mark.parametrize("cls", [ADMMConfig, WandaConfig, SparseGPTConfig, MagnitudeConfig])
def test_json_round_trip_through_registry(tmp_path, cls):
    config = cls(sparsity=0.6, ignore=["down_proj"], sparsity_overrides={"q_proj": 0.4}, seed=3)
    config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "pruning_config.json").read_text())
    assert data["method"] == cls.method and data["hf_prune_version"] == hf_prune.__version__
    loaded = PruningConfig.from_pretrained(tmp_path)
    assert type(loaded) is cls and loaded == config


def test_unknown_keys_dropped_with_warning(caplog):
    data = ADMMConfig(sparsity=0.5).to_dict() | {"from_the_future": 1}
    with caplog.at_level("WARNING"):
        config = PruningConfig.from_dict(data)
    assert isinstance(config, ADMMConfig) and "from_the_future" in caplog.text


def test_nm_pattern_implies_sparsity():
    assert ADMMConfig(pattern="2:4").sparsity == 0.5
    assert WandaConfig(pattern="4:8", sparsity=0.5).n_m == (4, 8)


def test_third_party_registration():
    from dataclasses import dataclass

    @register_pruning_method("test_third_party")
    @dataclass(kw_only=True)
    class ThirdParty(OneShotConfig):
        strength: float = 1.0

    assert "test_third_party" in hf_prune.registered_methods()
    loaded = PruningConfig.from_dict(ThirdParty(sparsity=0.3, strength=2.0).to_dict())
    assert isinstance(loaded, ThirdParty) and loaded.strength == 2.0
    with pytest.raises(ValueError, match="already registered"):
        register_pruning_method("admm")(ThirdParty)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(sparsity=0.0), r"ADMMConfig.sparsity must be a number in the open interval \(0, 1\), got 0.0"),
        (dict(sparsity=1.0), r"ADMMConfig.sparsity must be .* got 1.0"),
        (dict(sparsity=-0.2), r"ADMMConfig.sparsity"),
        (dict(), r"ADMMConfig.sparsity is required"),
        (dict(pattern="4:4"), r"ADMMConfig.pattern '4:4': N:M needs 0 < N < M"),
        (dict(pattern="5:4"), r"N:M needs 0 < N < M"),
        (dict(pattern="2-4"), r"ADMMConfig.pattern must be 'unstructured' or 'N:M'"),
        (dict(pattern="2:4", sparsity=0.6), r"contradicts pattern '2:4'"),
        (dict(sparsity=0.5, iterations=0), r"ADMMConfig.iterations must be an integer >= 1"),
        (dict(sparsity=0.5, mask_iterations=30), r"mask_iterations \(30\) must be <= iterations \(20\)"),
        (dict(sparsity=0.5, rho=0), r"ADMMConfig.rho must be a finite number > 0"),
        (dict(sparsity=0.5, mask_group="column"), r"ADMMConfig.mask_group must be one of \['layer', 'row'\]"),
        (dict(sparsity=0.5, mask_mode="oracle"), r"ADMMConfig.mask_mode must be one of"),
        (dict(sparsity=0.5, targets=[]), r"ADMMConfig.targets is empty"),
        (dict(sparsity=0.5, ignore="q_proj"), r"ADMMConfig.ignore must be a list"),
        (dict(sparsity=0.5, ignore=["("]), r"ADMMConfig.ignore: '\(' is not a valid regular expression"),
        (dict(sparsity=0.5, sparsity_overrides={"q_proj": 1.5}), r"sparsity_overrides\['q_proj'\] must be"),
        (dict(pattern="2:4", owl=True), r"ADMMConfig.owl needs pattern='unstructured'"),
        (dict(sparsity=0.95, owl=True, owl_lambda=0.08), r"owl_lambda=0.08 with sparsity=0.95"),
        (dict(sparsity=0.5, num_calibration_samples=0), r"num_calibration_samples must be an integer >= 1"),
    ],
)
def test_bad_config_raises_naming_field(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ADMMConfig(**kwargs)


def test_sparsegpt_block_size_must_fit_m():
    with pytest.raises(ValueError, match=r"SparseGPTConfig.block_size \(126\) must be a multiple of M=4"):
        SparseGPTConfig(pattern="2:4", block_size=126)
