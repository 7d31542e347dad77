"""DynSparse in a stock `Trainer` (callback) and through the `TrainingPlugin` that `PruningTrainer` uses."""

import json
import os

import pytest
import torch
from transformers import Trainer, TrainingArguments

from hf_prune import DynSparseCallback, DynSparseConfig, get_pruning_state
from hf_prune.methods.dynsparse import STATE_FILE, DynSparsePlugin
from hf_prune.training.plugin import get_training_plugin_class

from dynsparse_utils import ToyMLMData, check_masks_hold, tiny_bert_mlm

CONFIG = DynSparseConfig(sparsity=0.8, block_size=16, num_updates=3, pruning_ratio=0.5)


def _args(out, max_steps=8, **kw):
    kw = {"save_strategy": "steps", "save_steps": 4, **kw}
    return TrainingArguments(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=4, learning_rate=5e-3,
        logging_steps=2, report_to="none", use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0, **kw,
    )


def _train(out, resume=None, callback=None):
    model = tiny_bert_mlm(seed=0)
    callback = callback or DynSparseCallback(CONFIG)
    trainer = Trainer(model=model, args=_args(out), train_dataset=ToyMLMData(), callbacks=[callback])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callback


def test_trainer_callback_logs_checkpoints_and_resume_equals_uninterrupted(tmp_path):
    trainer, callback = _train(tmp_path / "full")
    updater = callback.updater
    check_masks_hold(updater)
    assert updater.step_count == 8 and updater.updates_done == 3
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    for key in ("dynsparse/sparsity", "dynsparse/pruning_ratio", "dynsparse/explored_dof",
                "dynsparse/flops_per_token_sparse", "dynsparse/flops_per_token_dense"):
        assert all(key in entry for entry in logged), key
    assert logged[-1]["dynsparse/sparsity"] == pytest.approx(0.8, abs=0.02)
    assert os.path.isfile(tmp_path / "full" / "checkpoint-4" / STATE_FILE)
    state = get_pruning_state(trainer.model)
    assert state is not None and state.layout == "block:16x16" and state.overall_sparsity >= 0.79

    # resume from the mid-run checkpoint in a fresh process-like setting: new model, new callback
    resumed, rcallback = _train(tmp_path / "full", resume=str(tmp_path / "full" / "checkpoint-4"))
    assert rcallback.updater.step_count == 8 and rcallback.updater.updates_done == 3
    for name, mask in updater.masks.items():
        assert torch.equal(mask.mask, rcallback.updater.masks[name].mask), name
        assert torch.equal(mask.ever_active, rcallback.updater.masks[name].ever_active), name
    for (n, a), b in zip(trainer.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=n)


def test_resume_without_dynsparse_state_fails_clearly(tmp_path):
    _train(tmp_path)
    os.remove(tmp_path / "checkpoint-4" / STATE_FILE)
    with pytest.raises(FileNotFoundError, match=STATE_FILE):
        _train(tmp_path, resume=str(tmp_path / "checkpoint-4"))


def test_training_plugin_contract():
    assert get_training_plugin_class(CONFIG) is DynSparsePlugin
    model = tiny_bert_mlm(seed=0)
    plugin = DynSparsePlugin(CONFIG, model)
    (callback,) = plugin.callbacks()
    assert isinstance(callback, DynSparseCallback) and callback.updater is plugin.updater
    state = plugin.state_dict()
    other = DynSparsePlugin(CONFIG.replace(), tiny_bert_mlm(seed=1))
    other.updater.generator.manual_seed(123)
    other.load_state_dict(state)
    assert torch.equal(other.updater.generator.get_state(), plugin.updater.generator.get_state())
    for name, mask in plugin.updater.masks.items():
        assert torch.equal(mask.mask, other.updater.masks[name].mask)
    with pytest.raises(ValueError, match="sparsity"):
        DynSparsePlugin(CONFIG.replace(sparsity=0.5), tiny_bert_mlm()).load_state_dict(state)
    exported = plugin.export(model)
    assert get_pruning_state(exported).config is CONFIG


def test_pruning_trainer_checkpoint_holds_the_nested_plugin_state(tmp_path):
    """`PruningTrainer` checkpoints `state_dict()` with per-module mask dicts: tensors to safetensors, the rest JSON."""
    from hf_prune.training.trainer import PLUGIN_STATE_JSON, load_plugin_state, save_plugin_state

    plugin = DynSparsePlugin(CONFIG, tiny_bert_mlm(seed=0))
    for mask in plugin.updater.masks.values():  # a pattern no fresh plugin starts from
        mask.mask.copy_(mask.mask.flip(0))
    plugin.updater.step_count, plugin.updater.updates_done = 5, 2
    save_plugin_state(plugin, str(tmp_path))
    saved = (tmp_path / PLUGIN_STATE_JSON).read_text()
    assert '"step_count": 5' in saved and ["masks", next(iter(plugin.updater.masks))] in json.loads(saved)["tensors"]
    other = DynSparsePlugin(CONFIG.replace(), tiny_bert_mlm(seed=1))
    load_plugin_state(other, str(tmp_path))
    assert (other.updater.step_count, other.updater.updates_done) == (5, 2)
    for name, mask in plugin.updater.masks.items():
        assert torch.equal(other.updater.masks[name].mask, mask.mask), name
    assert torch.equal(other.updater.generator.get_state(), plugin.updater.generator.get_state())


def _train_pruning_trainer(out, resume=None):
    from hf_prune import PruningTrainer

    trainer = PruningTrainer(model=tiny_bert_mlm(seed=0), args=_args(out), train_dataset=ToyMLMData(),
                             pruning_config=CONFIG)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_pruning_trainer_checkpoints_the_state_once_and_resumes_exactly(tmp_path):
    """Through `PruningTrainer` the masks live in the trainer's plugin state only (no second `dynsparse_state`
    copy per checkpoint), and resuming from it equals the uninterrupted run."""
    from hf_prune.training.trainer import PLUGIN_STATE_TENSORS

    full = _train_pruning_trainer(tmp_path)
    checkpoint = tmp_path / "checkpoint-4"
    assert os.path.isfile(checkpoint / PLUGIN_STATE_TENSORS) and not os.path.exists(checkpoint / STATE_FILE)
    resumed = _train_pruning_trainer(tmp_path, resume=str(checkpoint))
    updater, rupdater = full.pruning_plugin.updater, resumed.pruning_plugin.updater
    assert rupdater.restored and (rupdater.step_count, rupdater.updates_done) == (8, 3)
    for name, mask in updater.masks.items():
        assert torch.equal(mask.mask, rupdater.masks[name].mask), name
    for (n, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values()):
        torch.testing.assert_close(a, b, msg=n)


def test_pruning_trainer_export_round_trips_block_sparse(tmp_path):
    """PruningTrainer + DynSparse (16x16 blocks) -> export -> compressed save -> from_pretrained in a fresh process."""
    from export_utils import run_python

    from hf_prune import PruningTrainer, describe_export

    model = tiny_bert_mlm(seed=0)
    trainer = PruningTrainer(model=model, args=_args(tmp_path / "run", save_strategy="no"), train_dataset=ToyMLMData(),
                             pruning_config=CONFIG)
    trainer.train()
    exported = trainer.export_pruned_model()
    state = get_pruning_state(exported)
    assert state.layout == "block:16x16" and state.metrics["optimizer_steps"] == 8
    out = tmp_path / "export"
    exported.save_pretrained(out)
    desc = describe_export(out)
    assert desc["verified"] and desc["layout"] == "block:16x16"
    assert set(desc["codecs"].values()) == {"blockmask"} and len(desc["codecs"]) == len(state.module_sparsity)
    # 80 % of the 16x16 blocks are gone: the encoder's sparse weights take well under half their dense bytes
    assert desc["file_bytes"] < 0.8 * sum(p.numel() * 4 for p in exported.parameters())
    torch.save(exported.state_dict(), tmp_path / "expected.pt")
    proc = run_python(
        "import torch, hf_prune\n"
        "from transformers import AutoModelForMaskedLM\n"
        f"m = AutoModelForMaskedLM.from_pretrained({str(out)!r})\n"
        f"exp = torch.load({str(tmp_path / 'expected.pt')!r})\n"
        "bad = [k for k, v in m.state_dict().items() if not torch.equal(v, exp[k])]\n"
        "print('MISMATCH', bad)\n"
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MISMATCH []" in proc.stdout
