"""bf16 only where the CPU runs it natively; the CPU facts every card and benchmark records."""

from __future__ import annotations

import logging

import pytest
import torch

import hf_prune.cpu as cpu
from hf_prune import ADMMConfig, WandaConfig, get_pruning_state, oneshot

from conftest import VOCAB, tiny_llama, tiny_tokenizer


@pytest.fixture
def no_native_bf16(monkeypatch):
    """A CPU like an AVX2 EPYC: no native bf16, no GPU; the measured cost fixed so the message is known."""
    monkeypatch.setattr(cpu, "native_bf16", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(cpu, "bf16_slowdown", lambda: (17.8, 169.0))
    monkeypatch.setattr(cpu, "_said", set())


def test_auto_falls_back_to_fp32_with_one_info_line(no_native_bf16, caplog):
    with caplog.at_level(logging.INFO, logger="hf_prune"):
        assert cpu.use_bf16("auto", "recovery training") is False
        assert cpu.use_bf16("auto", "recovery training") is False  # said once per process
    lines = [r for r in caplog.records if "recovery training runs in fp32" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO and "no native bf16" in lines[0].getMessage()


def test_an_explicit_request_gets_a_warning_with_the_measured_cost(no_native_bf16, caplog):
    with caplog.at_level(logging.INFO, logger="hf_prune"):
        assert cpu.use_bf16(True, "recovery training") is False
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "169.0 ms in bf16 vs 17.8 ms in fp32 here (9.5x slower); running in fp32" in record.getMessage()


def test_native_bf16_and_gpus_keep_bf16(monkeypatch):
    monkeypatch.setattr(cpu, "native_bf16", lambda: True)
    assert cpu.use_bf16(True, "x", "cpu") is True and cpu.use_bf16("auto", "x") is True
    monkeypatch.setattr(cpu, "native_bf16", lambda: False)
    assert cpu.use_bf16(True, "x", torch.device("cuda", 0)) is True  # the device decides, not the host CPU
    assert cpu.use_bf16(False, "x") is False


def test_bad_request_is_refused():
    with pytest.raises(ValueError, match=r"bf16 must be True, False or 'auto', got 'yes'"):
        cpu.use_bf16("yes", "x")


def test_recovery_asked_for_bf16_trains_in_fp32_and_records_it(no_native_bf16, calibration_ids, caplog):
    pytest.importorskip("peft")
    from peft import LoraConfig

    from hf_prune.peft.recover import recover

    torch.manual_seed(0)
    model = tiny_llama()
    oneshot(model, WandaConfig(pattern="2:4"), calibration=calibration_ids, show_progress=False)
    texts = [" ".join(f"w{(i * 7 + j) % (VOCAB - 1) + 1}" for j in range(200)) for i in range(4)]
    with caplog.at_level(logging.WARNING, logger="hf_prune"):
        merged = recover(model, texts, tiny_tokenizer(), steps=2, seq_len=32, batch_size=2, bf16=True,
                         lora_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    assert get_pruning_state(merged).metrics["recovery_precision"] == "fp32"
    assert any("bf16 was requested for recovery training" in r.getMessage() for r in caplog.records)


def test_admm_bfloat16_matmul_runs_in_float32_without_native_bf16(no_native_bf16, calibration_ids, caplog):
    torch.manual_seed(0)
    fp32, asked = tiny_llama(), tiny_llama()
    asked.load_state_dict(fp32.state_dict())
    oneshot(fp32, ADMMConfig(sparsity=0.5), calibration=calibration_ids, show_progress=False)
    with caplog.at_level(logging.WARNING, logger="hf_prune"):
        oneshot(asked, ADMMConfig(sparsity=0.5, matmul_precision="bfloat16"), calibration=calibration_ids,
                show_progress=False)
    for a, b in zip(fp32.state_dict().values(), asked.state_dict().values()):
        assert torch.equal(a, b)  # bit-equal: the fallback is exactly the float32 run
    warnings = [r for r in caplog.records if "ADMM's matmul_precision='bfloat16'" in r.getMessage()]
    assert len(warnings) == 1  # once, not once per layer


def test_machine_state_records_the_cpu_capability():
    state = cpu.machine_state()
    assert state["torch_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert isinstance(state["native_bf16"], bool) and isinstance(state["vnni"], bool)
    assert state["cpus"] >= 1 and len(state["load_average"]) == 3
    assert "VNNI" in cpu.describe_cpu(state)
