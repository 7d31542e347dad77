"""Gate injection: the CoFi *masked model*.

[`inject_gates`] attaches a [`CoFiGates`] module to the model (as `model.hf_prune_cofi`, so the gates, the
Lagrange multipliers and the layer-distillation transform are saved in every checkpoint and synchronised by DDP like
any parameter) and registers forward hooks on the stock modules; the model's classes and weights are not changed.

The masked model, for gate values z (sampled while training, deterministic in eval or after freezing):

- attention: the context of head h is multiplied by `z_head[l, h]`; the output projection's result (bias included)
  by `z_mha[l] * z_hidden`;
- FFN: the activation of neuron i is multiplied by `z_neuron[l, i]`; the down projection's result (bias included) by
  `z_ffn[l] * z_hidden`;
- hidden dimension: every LayerNorm (embeddings and both per layer) normalises **only over the dimensions with
  z_hidden != 0** (the others are set to 0), then multiplies its output by `z_hidden`.

Why this makes physical removal exact: every hidden state is zero on the dropped dimensions, so the columns of the
linears that read them contribute nothing and can be removed; LayerNorm statistics are computed over the kept
dimensions only, which is what a LayerNorm of the smaller width computes; every gate multiplies a linear function
of weights (or a LayerNorm's affine output), so its value folds into those weights and biases.

Decoders (LLaMA family, pre-RMSNorm) are masked the Sheared-LLaMA way, see [`_inject_decoder_hooks`]: a layer gate
`z_layer[l]` multiplies both sublayer outputs of layer l, a head gate covers a KV group (its query heads' contexts),
and the hidden gate acts on every RMSNorm, which normalises over the kept dimensions only (Sheared-LLaMA's answer:
the RMS of the smaller model), then multiplies by `z_hidden`. A pre-norm residual stream is only ever read through
a norm (and the norms ignore the dropped dimensions), so the residual itself needs no mask, and the embeddings (tied
to the LM head or not) are only sliced.

A *removed* sublayer (its layer gate is 0, or none of its heads / neurons is left) is the identity: it passes its
input through unchanged, its LayerNorm skipped as well, as in the CoFi authors' code (`CoFiBertSelfOutput` returns the residual when the
gated output is all zero, and their pruned model drops a sublayer with no unit left). While training this is decided
per sampled gate value, like LayerDrop; after export the sublayer is gone entirely, which matters for the latency of
a small pruned model (no LayerNorm, no module chain).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ...state import mark_training
from .arch import Adapter
from .config import CoFiConfig
from .gates import HardConcreteGate, deterministic_gates
from .sparsity import mask_sparsity
from .targets import exact_arch_masks, resolve_arch_targets

ATTR = "hf_prune_cofi"
GATE_NAMES = ("head", "mha", "neuron", "ffn", "hidden", "layer")
# the layer-count constraints: sublayer kind -> (its layer gate, its unit gate)
SUBLAYER_GATES = {"attention": ("mha", "head"), "ffn": ("ffn", "neuron")}


class CoFiGates(nn.Module):
    """All CoFi state that lives with the model: gate logits, Lagrange multipliers, layer transform, frozen masks."""

    def __init__(self, config: CoFiConfig, adapter: Adapter, teacher_hidden_size: int | None = None):
        super().__init__()
        d = adapter.dims
        decoder = adapter.kind == "decoder"
        shapes = {
            "head": (d.num_layers, d.head_units) if config.prune_heads else None,
            "mha": (d.num_layers,) if config.prune_layers else None,
            "neuron": (d.num_layers, d.intermediate_size) if config.prune_neurons else None,
            "ffn": (d.num_layers,) if config.prune_layers else None,
            "hidden": (d.hidden_size,) if config.prune_hidden else None,
            "layer": (d.num_layers,) if config.prune_layers and decoder else None,  # Sheared-LLaMA's layer mask
        }
        self.gates = nn.ModuleDict(
            {n: HardConcreteGate(s, config.gate_init_droprate) for n, s in shapes.items() if s is not None}
        )
        self.lambda_1 = nn.Parameter(torch.zeros(()))
        self.lambda_2 = nn.Parameter(torch.zeros(()))
        # target_attention_layers / target_ffn_layers: sublayer kind -> number kept, each with its (lambda_1, lambda_2)
        self.layer_targets = {
            kind: n for kind, n in (("attention", config.target_attention_layers), ("ffn", config.target_ffn_layers))
            if n is not None
        }
        _check_layer_targets(self.layer_targets, d, config.sparsity_target())
        self.layer_lambdas = nn.ParameterDict({kind: nn.Parameter(torch.zeros(2)) for kind in self.layer_targets})
        # target architecture (decoders): dimension -> kept count, each with its (lambda_1, lambda_2)
        self.arch_targets = resolve_arch_targets(config, adapter)
        self.arch_lambdas = nn.ParameterDict({n: nn.Parameter(torch.zeros(2)) for n in self.arch_targets})
        self.layer_transform = None
        if teacher_hidden_size is not None:
            self.layer_transform = nn.Linear(d.hidden_size, teacher_hidden_size)
            with torch.no_grad():
                self.layer_transform.weight.copy_(torch.eye(teacher_hidden_size, d.hidden_size))
                self.layer_transform.bias.zero_()
        self.register_buffer("frozen", torch.zeros((), dtype=torch.bool))
        for n, g in self.gates.items():
            self.register_buffer(f"fixed_{n}", torch.zeros_like(g.log_alpha, requires_grad=False))
        self.dims = d
        self.head_dim = d.head_dim
        self.hidden_multiple_of = config.multiple_of
        self.current: dict[str, torch.Tensor] = {}
        self.removed: dict[str, torch.Tensor | None] = {}

    # -------------------------------------------------------------------------------------------------- masks
    def gate_parameters(self) -> list[nn.Parameter]:
        return [g.log_alpha for g in self.gates.values()]

    def lagrangian_parameters(self) -> list[nn.Parameter]:
        return [self.lambda_1, self.lambda_2, *self.layer_lambdas.values(), *self.arch_lambdas.values()]

    def is_frozen(self) -> bool:
        return bool(self.frozen.item())

    def deterministic_masks(self) -> dict[str, torch.Tensor]:
        """Fixed masks once frozen, else the deterministic masks of the current logits."""
        if self.is_frozen():
            return {n: getattr(self, f"fixed_{n}") for n in self.gates}
        return self.masks_at_offset(0.0)

    def keep_probabilities(self) -> dict[str, torch.Tensor]:
        return {n: g.keep_probability() for n, g in self.gates.items()}

    def refresh(self, training: bool) -> None:
        """Draws this forward pass's gate values (one hard-concrete sample per step while training)."""
        if training and not self.is_frozen():
            self.current = {n: g(deterministic=False) for n, g in self.gates.items()}
        else:
            self.current = dict(self.deterministic_masks())
        z_layer = self.current.get("layer")
        self.removed = {
            "attn": _removed(self.current.get("mha"), self.current.get("head"), z_layer),
            "ffn": _removed(self.current.get("ffn"), self.current.get("neuron"), z_layer),
        }

    def sublayer_scale(self, kind: str, layer: int, like: torch.Tensor) -> torch.Tensor | None:
        """Decoders: what sublayer `kind` ("attn" / "ffn") of `layer` is multiplied by: its sublayer gate times the
        layer gate, 0 when it is removed this pass (so that a bias cannot leak out of a removed sublayer)."""
        scale = None
        for name in ("mha" if kind == "attn" else "ffn", "layer"):
            z = self.z(name, like)
            if z is not None:
                scale = z[layer] if scale is None else scale * z[layer]
        removed = self.removed.get(kind)
        if removed is not None:
            keep = (~removed[layer]).to(like.dtype)
            scale = keep if scale is None else scale * keep
        return scale

    def masks_at_offset(self, offset: float, exact: bool = False) -> dict[str, torch.Tensor]:
        """Deterministic masks of the logits shifted by one common `offset` (0: the plain deterministic masks).

        The hidden mask keeps a multiple of `CoFiConfig.multiple_of` dimensions (see [`deterministic_gates`]). With
        a layer-count target, at most that many sublayers of the kind stay: those with the highest layer-gate logits
        among the ones that still have a head / neuron.
        """
        masks = {
            n: deterministic_gates(g.log_alpha + offset, self.hidden_multiple_of if n == "hidden" else 1)
            for n, g in self.gates.items()
        }
        for kind, n in self.layer_targets.items():
            layer_gate, unit_gate = SUBLAYER_GATES[kind]
            alive = ~_removed(masks[layer_gate], masks.get(unit_gate))
            if int(alive.sum()) > n:
                logits = self.gates[layer_gate].log_alpha.detach().masked_fill(~alive, float("-inf"))
                keep = torch.zeros_like(alive)
                keep[torch.topk(logits, n).indices] = True
                masks[layer_gate] = masks[layer_gate] * keep
        if exact and self.arch_targets:
            masks = exact_arch_masks(masks, self, self.arch_targets)
        return masks

    @torch.no_grad()
    def offset_for_target(self, target: float, iterations: int = 40) -> tuple[float, float]:
        """The common logit offset whose deterministic masks come closest to sparsity `target`, and that sparsity.

        Sparsity falls as the offset grows (every keep probability rises), in steps as whole units come back, so a
        bisection over the offset finds the step nearest the target. Written here because the Lagrangian controller
        alone ends a few points off the target in short runs; this is hf_prune's addition, not part of the paper.
        """
        def sparsity(offset: float) -> float:
            return mask_sparsity(self.dims, self.masks_at_offset(offset, exact=True))

        lo, hi = -30.0, 30.0  # sparsity(lo) >= target >= sparsity(hi) for any logits this far apart
        best = min(((abs(sparsity(o) - target), o) for o in (0.0, lo, hi)))
        for _ in range(iterations):
            mid = (lo + hi) / 2
            s = sparsity(mid)
            best = min(best, (abs(s - target), mid))
            if s > target:
                lo = mid
            else:
                hi = mid
        return best[1], sparsity(best[1])

    @torch.no_grad()
    def freeze(self, target: float | None = None) -> float:
        """Fixes the deterministic masks; from now on the gates and the Lagrangian no longer train.

        With `target`, the masks are those of the logits shifted by [`offset_for_target`]; returns the offset used.
        With a target architecture, every targeted dimension keeps exactly its target (see [`exact_arch_masks`]).
        """
        offset = self.offset_for_target(target)[0] if target is not None else 0.0
        for n, m in self.masks_at_offset(offset, exact=True).items():
            getattr(self, f"fixed_{n}").copy_(m)
        self.frozen.fill_(True)
        for p in self.gate_parameters() + self.lagrangian_parameters():
            p.requires_grad_(False)
        return offset

    def z(self, name: str, like: torch.Tensor) -> torch.Tensor | None:
        v = self.current.get(name)
        return None if v is None else v.to(dtype=like.dtype)


def _check_layer_targets(targets: dict[str, int], d, target_sparsity: float | None) -> None:
    """Refuses layer-count targets the model does not have, or that cannot keep `1 - target_sparsity` of it."""
    for kind, n in targets.items():
        if n > d.num_layers:
            raise ValueError(f"CoFiConfig.target_{kind}_layers={n} is more than the model's {d.num_layers} layers")
    if not targets or target_sparsity is None:
        return
    attn = targets.get("attention", d.num_layers) * d.attention_params
    ffn = targets.get("ffn", d.num_layers) * d.ffn_params
    if (attn + ffn) / d.full_params < 1.0 - target_sparsity:
        given = ", ".join(f"target_{k}_layers={n}" for k, n in targets.items())
        raise ValueError(
            f"CoFiConfig: {given} leave at most {(attn + ffn) / d.full_params:.1%} of the prunable parameters, but "
            f"target_sparsity={target_sparsity} keeps {1.0 - target_sparsity:.1%}; allow more layers or prune more"
        )


def _removed(
    z_layer: torch.Tensor | None, z_units: torch.Tensor | None, z_whole: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Per layer: is the sublayer removed this pass (its sublayer gate is 0, or none of its heads / neurons is left,
    or, for decoders, its whole layer's gate is 0)?"""
    flags = []
    if z_layer is not None:
        flags.append(z_layer == 0)
    if z_units is not None:
        flags.append((z_units == 0).all(-1))
    if z_whole is not None:
        flags.append(z_whole == 0)
    if not flags:
        return None
    out = flags[0]
    for f in flags[1:]:
        out = out | f
    return out


# ------------------------------------------------------------------------------------------------------ hooks
def masked_layer_norm(x: torch.Tensor, ln: nn.LayerNorm, z: torch.Tensor | None,
                      stock_output: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the dimensions where `z != 0` only, zero elsewhere, times `z`. `stock_output` (the norm's own
    output on `x`) is reused when every dimension is kept."""
    if z is None:
        return stock_output
    z = z.to(x.dtype)
    keep = torch.nonzero(z, as_tuple=True)[0]
    if keep.numel() == z.numel():
        y = stock_output
    else:
        w = ln.weight.index_select(0, keep) if ln.weight is not None else None
        b = ln.bias.index_select(0, keep) if ln.bias is not None else None
        part = F.layer_norm(x.index_select(-1, keep), (keep.numel(),), w, b, ln.eps)
        y = x.new_zeros(x.shape).index_copy(-1, keep, part)
    return y * z


def _norm_hook(gates: CoFiGates, masked_norm):
    """A forward hook that replaces a norm's output with `masked_norm(x, norm, z_hidden, stock_output)`.

    A hook, not a patched `forward`: transformers (>= 5.25) kernelizes models loaded with `from_pretrained` and
    re-kernelizes them on every `train()` / `eval()` switch, which resets the `forward` of kernel-decorated modules
    (LLaMA's RMSNorm) and silently dropped a patch; forward hooks are left alone by that and by accelerate's hooks."""

    def hook(norm, args, out):
        z = gates.z("hidden", args[0])
        return None if z is None else masked_norm(args[0], norm, z, out)

    return hook


def inject_gates(
    model: nn.Module, config: CoFiConfig, adapter: Adapter, teacher_hidden_size: int | None = None
) -> CoFiGates:
    """Attaches `CoFiGates` to `model` and registers the masking hooks. Returns the gates module."""
    if hasattr(model, ATTR):
        raise ValueError("This model already carries CoFi gates (model.hf_prune_cofi); build a fresh student")
    ref = next(model.parameters())
    gates = CoFiGates(config, adapter, teacher_hidden_size).to(device=ref.device)
    model.add_module(ATTR, gates)
    mark_training(model, "CoFi")  # for good: the gated model stays the training model; the export is a new one
    handles = [model.register_forward_pre_hook(lambda mod, args: gates.refresh(mod.training))]
    if adapter.kind == "decoder":
        gates._hook_handles = handles + _inject_decoder_hooks(gates, adapter)
        return gates
    dh = adapter.dims.head_dim

    for layer in range(adapter.dims.num_layers):

        def heads_pre(mod, args, layer=layer):
            z = gates.z("head", args[0])
            if z is None:
                return None
            return (args[0] * z[layer].repeat_interleave(dh),) + tuple(args[1:])

        def attn_out(mod, args, out, layer=layer):
            scale = _combine(gates.z("mha", out), layer, gates.z("hidden", out))
            return out if scale is None else out * scale

        def neurons(mod, args, out, layer=layer):
            z = gates.z("neuron", out)
            return out if z is None else out * z[layer]

        def ffn_out(mod, args, out, layer=layer):
            scale = _combine(gates.z("ffn", out), layer, gates.z("hidden", out))
            return out if scale is None else out * scale

        def identity_if_removed(kind: str, layer: int = layer):
            def hook(mod, args, out):  # args = (sublayer output, residual); a removed sublayer passes the residual
                removed = gates.removed.get(kind)
                return out if removed is None else torch.where(removed[layer], args[1], out)

            return hook

        o = adapter.attn_out(layer)
        handles += [
            o.register_forward_pre_hook(heads_pre),
            o.register_forward_hook(attn_out),
            adapter.ffn_act_module(layer).register_forward_hook(neurons),
            adapter.ffn_down(layer).register_forward_hook(ffn_out),
            adapter.attn_block(layer).register_forward_hook(identity_if_removed("attn")),
            adapter.ffn_block(layer).register_forward_hook(identity_if_removed("ffn")),
        ]
    if "hidden" in gates.gates:
        handles += [ln.register_forward_hook(_norm_hook(gates, masked_layer_norm)) for ln in adapter.layernorms()]
    gates._hook_handles = handles  # plain attribute: not part of the state dict
    return gates


def masked_rms_norm(x: torch.Tensor, norm: nn.Module, z: torch.Tensor | None,
                    stock_output: torch.Tensor) -> torch.Tensor:
    """RMSNorm over the dimensions where `z != 0` only (the RMS a norm of the smaller width computes), zero
    elsewhere, times `z`; the stock norm's arithmetic (float32 statistics, weight applied in the input dtype).
    `stock_output` (the norm's own output on `x`) is used when every dimension is kept."""
    if z is None:
        return stock_output
    z = z.to(x.dtype)
    keep = torch.nonzero(z, as_tuple=True)[0]
    if keep.numel() == z.numel():
        return stock_output * z
    part = x.index_select(-1, keep).to(torch.float32)
    part = part * torch.rsqrt(part.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    part = norm.weight.index_select(0, keep) * part.to(x.dtype)
    return x.new_zeros(x.shape).index_copy(-1, keep, part.to(x.dtype)) * z


def _inject_decoder_hooks(gates: CoFiGates, adapter: Adapter) -> list:
    """Masking hooks of a LLaMA-family decoder (see the module docstring). Returns the hook handles."""
    unit = adapter.dims.group_size * adapter.dims.head_dim  # o_proj input columns of one KV group
    handles = []
    for layer in range(adapter.dims.num_layers):

        def heads_pre(mod, args, layer=layer):  # o_proj input: (batch, seq, heads * head_dim), heads in group order
            z = gates.z("head", args[0])
            return None if z is None else (args[0] * z[layer].repeat_interleave(unit),) + tuple(args[1:])

        def neurons_pre(mod, args, layer=layer):  # down_proj input: act(gate(x)) * up(x)
            z = gates.z("neuron", args[0])
            return None if z is None else (args[0] * z[layer],) + tuple(args[1:])

        def scaled(kind: str, layer: int = layer):
            def hook(mod, args, out):
                scale = gates.sublayer_scale(kind, layer, out)
                return out if scale is None else out * scale

            return hook

        o, down = adapter.attn_out(layer), adapter.ffn_down(layer)
        handles += [
            o.register_forward_pre_hook(heads_pre),
            o.register_forward_hook(scaled("attn")),
            down.register_forward_pre_hook(neurons_pre),
            down.register_forward_hook(scaled("ffn")),
        ]
    if "hidden" in gates.gates:
        handles += [norm.register_forward_hook(_norm_hook(gates, masked_rms_norm)) for norm in adapter.norms()]
    return handles


def _combine(z_layer: torch.Tensor | None, layer: int, z_hidden: torch.Tensor | None) -> torch.Tensor | None:
    if z_layer is None:
        return z_hidden
    return z_layer[layer] if z_hidden is None else z_layer[layer] * z_hidden


def get_gates(model: nn.Module) -> CoFiGates | None:
    model = getattr(model, "module", model)  # unwrap DDP
    return getattr(model, ATTR, None)
