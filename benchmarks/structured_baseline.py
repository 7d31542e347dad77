"""The one-shot structured baseline of `benchmarks/cofi_smollm2.py` (LLM-Pruner / FLAP style), then the same
continued training as CoFi.

Ranking, on calibration windows through the dense model (one pass, forward hooks):
- a KV group (one key / value head and its query heads) by the weight-times-activation norm of its `o_proj` input
  columns, `sum_c ||X_c|| * sum_r |W_o[r, c]|` (Wanda's per-weight score `|W| ||X||` summed over the group);
- an FFN neuron likewise over its `down_proj` column;
- a hidden dimension over every weight column that reads it (Q, K, V, gate, up of every layer and the LM head,
  each with the norm of that matrix's input on the dimension);
- a whole layer by its block influence, `1 - cos(h_in, h_out)` averaged over tokens (ShortGPT, Men et al. 2024):
  a weight-times-activation sum is not comparable between layers.
The masks keep exactly the CoFi export's per-layer shape, and the shrinking is CoFi's own export
(`hf_prune.methods.cofi.prune.build_pruned_model` with 0/1 masks), so the two models differ only in which units
were kept and how they were chosen. Continued training: the same `TrainingArguments`, data and loss (next-token
cross-entropy + KL to the dense model's next-token distribution) as CoFi's fixed-mask phase.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import Trainer

from hf_prune.methods.cofi.arch import get_adapter
from hf_prune.methods.cofi.distill import token_prediction_loss
from hf_prune.methods.cofi.prune import build_pruned_model
from hf_prune.training.trainer import extra_term_scale


@torch.no_grad()
def importance_scores(model: nn.Module, windows: torch.Tensor, batch_size: int = 4) -> dict[str, torch.Tensor]:
    """Scores of every KV group (`heads`, `(L, kv)`), neuron (`neurons`, `(L, I)`), hidden dim (`hidden`, `(H,)`)
    and layer (`layers`, `(L,)`) of a dense LLaMA-family `model` on `windows` (`(n, seq)` token ids)."""
    ad = get_adapter(model)
    d = ad.dims
    sq: dict[int, torch.Tensor] = {}  # id(linear) -> sum over tokens of its input squared, per input channel

    def hook(mod, args):
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        sq[id(mod)] = sq.get(id(mod), 0) + x.pow(2).sum(0)

    readers = []  # the linears whose input columns are hidden dims
    for i in range(d.num_layers):
        readers += [*ad.qkv(i), *ad.ffn_in(i)]
    readers.append(ad.lm_head())
    watched = readers + [ad.attn_out(i) for i in range(d.num_layers)] + [ad.ffn_down(i) for i in range(d.num_layers)]
    handles = [m.register_forward_pre_hook(hook) for m in watched]
    influence = torch.zeros(d.num_layers)
    tokens = 0
    was_training = model.training
    model.eval()
    try:
        for batch in windows.split(batch_size):
            out = model(input_ids=batch, output_hidden_states=True, use_cache=False)
            hs = out.hidden_states
            for i in range(d.num_layers):
                cos = nn.functional.cosine_similarity(hs[i].float(), hs[i + 1].float(), dim=-1)
                influence[i] += (1 - cos).sum()
            tokens += batch.numel()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    def wanda(lin: nn.Linear) -> torch.Tensor:  # per input column: ||X_c|| * sum_r |W[r, c]|
        return sq[id(lin)].sqrt() * lin.weight.detach().float().abs().sum(0)

    unit = d.group_size * d.head_dim
    heads = torch.stack([wanda(ad.attn_out(i)).view(d.head_units, unit).sum(-1) for i in range(d.num_layers)])
    neurons = torch.stack([wanda(ad.ffn_down(i)) for i in range(d.num_layers)])
    hidden = sum(wanda(lin) for lin in readers)
    return {"heads": heads, "neurons": neurons, "hidden": hidden, "layers": influence / tokens}


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    mask = torch.zeros_like(scores)
    if k > 0:
        mask[torch.topk(scores, k).indices] = 1.0
    return mask


def shape_masks(scores: dict[str, torch.Tensor], structure: dict[str, Any], num_layers: int) -> dict[str, torch.Tensor]:
    """0/1 masks (CoFi's gate names) that keep the highest-scoring units in exactly `structure`'s shape.

    A plain (uniform) structure lists only its kept layers: the baseline keeps as many layers, chosen by block
    influence, each with the structure's heads and width. A heterogeneous one lists every layer: layer `i` keeps
    layer `i`'s counts.
    """
    specs = structure["layers"]
    if structure["plain"]:
        keep_layers = _top(scores["layers"], len(specs))
        per_layer = [specs[0] if keep_layers[i] else None for i in range(num_layers)]
    else:
        per_layer = list(specs)
    head = torch.zeros_like(scores["heads"])
    neuron = torch.zeros_like(scores["neurons"])
    for i, spec in enumerate(per_layer):
        if spec is not None:
            head[i] = _top(scores["heads"][i], int(spec["kv_heads"]))
            neuron[i] = _top(scores["neurons"][i], int(spec["intermediate_size"]))
    ones = torch.ones(num_layers)
    return {"head": head, "mha": ones.clone(), "neuron": neuron, "ffn": ones.clone(),
            "hidden": _top(scores["hidden"], int(structure["hidden_size"])), "layer": ones.clone()}


def prune_to_shape(model: nn.Module, windows: torch.Tensor, structure: dict[str, Any]) -> tuple[nn.Module, dict]:
    """The one-shot baseline: a physically smaller copy of the dense `model` in `structure`'s shape (CoFi's export
    path), and the masks it kept."""
    scores = importance_scores(model, windows)
    masks = shape_masks(scores, structure, get_adapter(model).dims.num_layers)
    small, _ = build_pruned_model(model, masks, multiple_of=1)
    return small, masks


class DistillationTrainer(Trainer):
    """`Trainer` with CoFi's fixed-mask loss: the model's own next-token loss times `hard_label_weight` plus
    `distill_pred_weight` times the per-token KL to `teacher_model` (computed as `PruningTrainer` and the CoFi
    plugin do, so both runs weight the terms alike, gradient accumulation included)."""

    def __init__(self, *args, teacher_model: nn.Module, temperature: float = 1.0, hard_label_weight: float = 1.0,
                 distill_pred_weight: float = 1.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher_model = teacher_model.eval().requires_grad_(False).to(self.args.device)
        self.temperature, self.hard_label_weight, self.distill_pred_weight = (
            temperature, hard_label_weight, distill_pred_weight)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not model.training:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        with torch.no_grad():
            teacher = self.teacher_model(**{k: v for k, v in inputs.items() if k != "labels"})
        kl = token_prediction_loss(outputs.logits, teacher.logits, self.temperature, inputs.get("attention_mask"))
        total = self.hard_label_weight * loss + extra_term_scale(self, num_items_in_batch) * self.distill_pred_weight * kl
        return (total, outputs) if return_outputs else total
