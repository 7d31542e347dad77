"""Bad values for every field of every registered config, generated from the dataclass fields themselves: a new
field is covered without touching this file. Each must be refused at construction and on assignment, naming
`Class.field`, and a refused assignment leaves the config as it was."""

from __future__ import annotations

import dataclasses
import math
import types
import typing

import pytest
import torch

import hf_prune
from hf_prune import (
    ADMMConfig,
    CoFiConfig,
    DynSparseConfig,
    MagnitudeConfig,
    SparseGPTConfig,
    StructuredConfig,
    WandaConfig,
)

# The smallest valid arguments of each shipped method (everything else defaults).
VALID = {
    ADMMConfig: dict(sparsity=0.5),
    WandaConfig: dict(sparsity=0.5),
    SparseGPTConfig: dict(sparsity=0.5),
    MagnitudeConfig: dict(sparsity=0.5),
    CoFiConfig: dict(target_sparsity=0.6),
    DynSparseConfig: dict(sparsity=0.9),
    StructuredConfig: dict(target_layers=2),
}


def test_every_registered_shipped_method_is_fuzzed():
    shipped = {hf_prune.get_config_class(m) for m in hf_prune.registered_methods()
               if hf_prune.get_config_class(m).__module__.startswith("hf_prune.")}
    assert shipped <= set(VALID), f"add the new method's valid arguments to VALID: {shipped - set(VALID)}"


def _kinds(hint) -> set:
    """The plain types a field annotation admits (`float | None` -> {float, NoneType}; `list[str]` -> {list})."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return set().union(*(_kinds(h) for h in typing.get_args(hint)))
    return {origin or hint}


def _item_kind(hint, container):
    for h in (typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)):
        if typing.get_origin(h) is container:
            return typing.get_args(h)
    return None


def bad_values(hint) -> list:
    """Values the annotation does not admit, by what it admits (written independently of the library's checker)."""
    kinds = _kinds(hint)
    out = []
    if float in kinds:
        out += [math.nan, math.inf, -math.inf, "0.5", True]
    elif int in kinds:
        out += [1.5, "3", True, math.nan]
    if bool in kinds and kinds <= {bool}:
        out += [1, "yes", None]
    if str in kinds and kinds <= {str}:
        out += [3, None, ["a"]]
    if type(None) not in kinds and not kinds & {str}:
        out.append(None)
    if list in kinds:
        (item,) = _item_kind(hint, list)
        if str not in kinds:
            out.append("not-a-list")
        out.append([object()])
        if item is float:
            out.append([0.5, math.nan])
        if item is int:
            out.append([1, 2.5])
        if item is str:
            out.append(["ok", 3])
    if dict in kinds:
        _, value = _item_kind(hint, dict)
        out += [["a", 0.5], {"q_proj": "x"}]
        if value is float:
            out.append({"q_proj": math.nan})
    return out


def _cases():
    for cls, valid in VALID.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            for value in bad_values(hints[f.name]):
                yield pytest.param(cls, valid, f.name, value, id=f"{cls.__name__}.{f.name}={value!r}")
            if f.metadata.get("hf_prune_regex"):
                kinds = _kinds(hints[f.name])
                regex_bad = ["(["] if str in kinds else []
                regex_bad += [["(["]] if list in kinds else []
                regex_bad += [{"([": 0.5}] if dict in kinds else []
                for value in regex_bad:
                    yield pytest.param(cls, valid, f.name, value, id=f"{cls.__name__}.{f.name}=regex {value!r}")


CASES = list(_cases())


def test_fuzz_covers_every_field():
    covered = {(p.values[0], p.values[2]) for p in CASES}
    every = {(cls, f.name) for cls in VALID for f in dataclasses.fields(cls)}
    assert every == covered


@pytest.mark.parametrize("cls, valid, name, value", CASES)
def test_bad_value_refused_at_construction(cls, valid, name, value):
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{name}\b"):
        cls(**{**valid, name: value})


@pytest.mark.parametrize("cls, valid, name, value", CASES)
def test_bad_value_refused_on_assignment_and_config_unchanged(cls, valid, name, value):
    config = cls(**valid)
    before = config.to_dict()
    with pytest.raises(ValueError, match=rf"{cls.__name__}\.{name}\b"):
        setattr(config, name, value)
    assert config.to_dict() == before


def test_assignment_of_a_good_value_works_and_is_revalidated():
    config = ADMMConfig(sparsity=0.5)
    config.iterations = 30
    assert config.iterations == 30
    with pytest.raises(ValueError, match=r"ADMMConfig.mask_iterations \(15\) must be <= iterations \(10\)"):
        config.iterations = 10  # a cross-field rule, not only the field's own type
    assert config.iterations == 30
    with pytest.raises(ValueError, match=r"ADMMConfig.sparsity must be a number in the open interval \(0, 1\), got 1.5"):
        config.sparsity = 1.5
    assert config.sparsity == 0.5


def test_nan_message_names_field_and_value():
    with pytest.raises(ValueError, match=r"^ADMMConfig.damping must be a finite number, got nan$"):
        ADMMConfig(sparsity=0.5, damping=float("nan"))
    with pytest.raises(ValueError, match=r"CoFiConfig.temperature must be a finite number, got inf"):
        CoFiConfig(temperature=float("inf"))
    with pytest.raises(ValueError, match=r"SparseGPTConfig.damping must be a finite number, got -inf"):
        SparseGPTConfig(sparsity=0.5, damping=-float("inf"))


def test_lists_changed_in_place_are_caught_by_the_entry_points():
    from conftest import TINY_MODELS

    config = MagnitudeConfig(sparsity=0.5, ignore=["down_proj"])
    config.ignore.append("([")  # bypasses __setattr__
    model = TINY_MODELS["llama"]()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=r"MagnitudeConfig.ignore: '\(\[' is not a valid regular expression"):
        hf_prune.oneshot(model, config)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    dyn = DynSparseConfig(sparsity=0.9, target_modules=["query"])
    dyn.target_modules.append(5)
    with pytest.raises(ValueError, match=r"DynSparseConfig.target_modules must be"):
        hf_prune.attach(TINY_MODELS["bert"](), dyn, total_steps=10)


def test_json_with_nan_is_refused_on_load(tmp_path):
    (tmp_path / "pruning_config.json").write_text('{"method": "admm", "sparsity": 0.5, "rho": NaN}')
    with pytest.raises(ValueError, match=r"ADMMConfig.rho must be a finite number, got nan"):
        hf_prune.PruningConfig.from_pretrained(tmp_path)
