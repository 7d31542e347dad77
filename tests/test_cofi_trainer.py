"""CoFi through PruningTrainer: Lagrangian control, checkpoint/resume, fresh-process loading, generic plugins."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from transformers import TrainerCallback

from hf_prune import CoFiConfig, PruningConfig, PruningTrainer, register_pruning_method
from hf_prune.methods.cofi.model import get_gates
from hf_prune.methods.cofi.sparsity import expected_sparsity
from hf_prune.methods.cofi.structure import describe_structure
from hf_prune.training.plugin import TrainingPlugin, register_training_plugin

from cofi_helpers import ToyDataset, tiny_bert, training_args as _args

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _sparsity(model):
    gates = get_gates(model)
    return expected_sparsity(gates.dims, **gates.keep_probabilities()).item()


@pytest.mark.parametrize("target", [0.85, 0.05])
def test_lagrangian_moves_expected_sparsity_toward_target(tmp_path, target):
    student, teacher = tiny_bert(0), tiny_bert(0)
    cfg = CoFiConfig(target_sparsity=target, sparsity_warmup_steps=0, finetune_steps=0,
                     gate_learning_rate=0.1, lagrangian_learning_rate=0.1)
    trainer = PruningTrainer(model=student, teacher_model=teacher, args=_args(tmp_path, max_steps=20),
                             pruning_config=cfg, train_dataset=ToyDataset())
    start = _sparsity(student)
    trainer.train()
    end = _sparsity(student)
    assert abs(end - target) < abs(start - target) - 0.05, (start, end, target)
    logs = [h for h in trainer.state.log_history if "expected_sparsity" in h]
    for key in ("target_sparsity", "lambda_1", "lambda_2", "loss_distill_pred", "loss_distill_layer",
                "loss_lagrangian", "expected_heads", "expected_neurons", "expected_hidden", "expected_mha_layers"):
        assert key in logs[-1], key


def _run(tmp_path, name, resume=None, max_steps=8, save_steps=None):
    student, teacher = tiny_bert(0), tiny_bert(1)
    cfg = CoFiConfig(target_sparsity=0.5, sparsity_warmup_steps=3, finetune_steps=2,
                     gate_learning_rate=0.05, lagrangian_learning_rate=0.05)
    kw = dict(max_steps=max_steps)
    if save_steps:
        kw.update(save_strategy="steps", save_steps=save_steps)
    trainer = PruningTrainer(model=student, teacher_model=teacher, args=_args(tmp_path / name, **kw),
                             pruning_config=cfg, train_dataset=ToyDataset())
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def test_resume_from_checkpoint_equals_uninterrupted_run(tmp_path):
    full = _run(tmp_path, "full")
    _run(tmp_path, "part", max_steps=8, save_steps=4)  # checkpoint-4 lies before the masks freeze (step 6)
    ckpt = tmp_path / "part" / "checkpoint-4"
    assert ckpt.is_dir()
    resumed = _run(tmp_path, "resumed", resume=str(ckpt))
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert set(a) == set(b)
    assert any(k.startswith("hf_prune_cofi.gates.") for k in a)
    assert bool(a["hf_prune_cofi.frozen"]) and bool(b["hf_prune_cofi.frozen"])
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=0, msg=k)
    # and it did change something from the checkpoint state (the test could fail)
    assert not torch.equal(a["hf_prune_cofi.lambda_1"], torch.zeros(()))


_LOAD_SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    {imports}
    from transformers import AutoModelForSequenceClassification
    path, out = sys.argv[1], sys.argv[2]
    try:
        model = AutoModelForSequenceClassification.from_pretrained(path)
    except Exception as err:
        json.dump({{"error": f"{{type(err).__name__}}: {{err}}"}}, open(out, "w")); sys.exit(0)
    ids = torch.load(path + "/inputs.pt", weights_only=True)
    with torch.no_grad():
        logits = model(**ids).logits
    res = {{"logits": logits.tolist(), "cls": type(model).__name__}}
    if {extra}:
        from hf_prune.methods.cofi.structure import describe_structure
        res["structure"] = describe_structure(model)
        model.half(); model.float()
        model.save_pretrained(path + "/again")
        again = AutoModelForSequenceClassification.from_pretrained(path + "/again")
        with torch.no_grad():
            res["again"] = again(**ids).logits.tolist()
    json.dump(res, open(out, "w"))
    """
)


def _fresh_process(tmp_path, path, with_hf_prune):
    script = tmp_path / f"load_{with_hf_prune}.py"
    script.write_text(_LOAD_SCRIPT.format(imports="import hf_prune" if with_hf_prune else "", extra=with_hf_prune))
    out = tmp_path / f"out_{with_hf_prune}.json"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="warning")
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if not with_hf_prune:  # make sure hf_prune cannot be imported at all
        env["PYTHONPATH"] = str(tmp_path / "empty")
        proc = subprocess.run([sys.executable, "-I", str(script), str(path), str(out)], env=env,
                              capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    else:
        proc = subprocess.run([sys.executable, str(script), str(path), str(out)], env=env,
                              capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text()), proc.stderr


def test_fresh_process_from_pretrained_gives_same_predictions(tmp_path):
    student, teacher = tiny_bert(0), tiny_bert(1)
    cfg = CoFiConfig(target_sparsity=0.6, sparsity_warmup_steps=2, finetune_steps=2,
                     gate_learning_rate=0.2, lagrangian_learning_rate=0.2)
    trainer = PruningTrainer(model=student, teacher_model=teacher, args=_args(tmp_path / "run", max_steps=6),
                             pruning_config=cfg, train_dataset=ToyDataset())
    trainer.train()
    # make the layers clearly heterogeneous regardless of how far the short run got
    with torch.no_grad():
        get_gates(student).fixed_head[0, :2] = 0
        get_gates(student).fixed_neuron[1, :30] = 0
    small = trainer.export_pruned_model()
    layers = describe_structure(small)["layers"]
    assert len({layer["heads"] for layer in layers}) > 1 and len({layer["intermediate_size"] for layer in layers}) > 1
    path = tmp_path / "pruned"
    small.save_pretrained(str(path))
    ds = ToyDataset(n=6, seed=3)
    inputs = {"input_ids": ds.ids, "attention_mask": ds.mask}
    torch.save(inputs, str(path / "inputs.pt"))
    with torch.no_grad():
        expected = small(**inputs).logits
    res, _ = _fresh_process(tmp_path, path, with_hf_prune=True)
    assert res["cls"] == "BertForSequenceClassification"
    assert res["structure"]["layers"] == layers
    torch.testing.assert_close(torch.tensor(res["logits"]), expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(res["again"]), expected, atol=1e-5, rtol=0)
    # without hf_prune: an error (never random weights), and the log names hf_prune
    res, stderr = _fresh_process(tmp_path, path, with_hf_prune=False)
    assert "error" in res, res
    assert "hf_prune" in stderr + res["error"]


# ----------------------------------------------------------------------------- a method that only has callbacks
@register_pruning_method("_test_callbacks_only")
@dataclasses.dataclass(kw_only=True)
class _CallbacksOnlyConfig(PruningConfig):
    every: int = 2


class _Counter(TrainerCallback):
    def __init__(self, plugin):
        self.plugin = plugin

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.plugin.config.every == 0:
            self.plugin.updates += 1


@register_training_plugin(_CallbacksOnlyConfig)
class _CallbacksOnlyPlugin(TrainingPlugin):
    def __init__(self, config, model, **kwargs):
        super().__init__(config, model)
        self.updates = 0

    def callbacks(self):
        return [_Counter(self)]

    def state_dict(self):
        return {"updates": self.updates, "marker": torch.arange(3.0)}

    def load_state_dict(self, state):
        self.updates = state["updates"]
        assert torch.equal(state["marker"], torch.arange(3.0))


def test_plugin_with_only_callbacks_runs_and_checkpoints(tmp_path):
    trainer = PruningTrainer(model=tiny_bert(0), args=_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=3),
                             pruning_config=_CallbacksOnlyConfig(), train_dataset=ToyDataset())
    trainer.train()
    assert trainer.pruning_plugin.updates == 3
    assert (tmp_path / "checkpoint-3" / "hf_prune_plugin_state.json").is_file()
    again = PruningTrainer(model=tiny_bert(0), args=_args(tmp_path, max_steps=6),
                           pruning_config=_CallbacksOnlyConfig(), train_dataset=ToyDataset())
    again.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert again.pruning_plugin.updates == 3  # 1 restored + 2 more
    with pytest.raises(ValueError, match="teacher_model"):
        PruningTrainer(model=tiny_bert(0), teacher_model=tiny_bert(1), args=_args(tmp_path, max_steps=1),
                       pruning_config=_CallbacksOnlyConfig(), train_dataset=ToyDataset())
