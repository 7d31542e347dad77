"""Keeps masking when a saved masked adapter is loaded with stock `peft.PeftModel.from_pretrained(base, dir)`.

peft rebuilds adapters from `adapter_config.json`, which cannot name a custom layer class, so it creates ordinary
`lora.Linear` layers. Every masked layer saved a `lora_sparse` marker in the adapter's safetensors; peft loads the
weights with `load_state_dict`, where the marker arrives as an unexpected key. A load-state-dict post hook (PyTorch's
public hook API) on every hf_prune model turns exactly those layers back into `SparseLoraLinear` (a subclass that
adds no state of its own) and consumes the marker keys. Does not import peft until a marker is seen.
"""

from __future__ import annotations

_TOKEN = ".lora_sparse"


def _restore_masked_layers(module, incompatible_keys) -> None:
    marked = [k for k in incompatible_keys.unexpected_keys if k.endswith(_TOKEN) or _TOKEN + "." in k]
    if not marked:
        return
    from peft.tuners.lora.layer import Linear as LoraLinear

    from .layer import SparseLoraLinear

    layers = {name: m for name, m in module.named_modules() if isinstance(m, LoraLinear)}
    for key in marked:
        path, _, adapter = key.partition(_TOKEN)
        match = max((n for n in layers if path == n or path.endswith("." + n)), key=len, default=None)
        if match is None:
            continue
        layer = layers[match]
        if not isinstance(layer, SparseLoraLinear):
            layer.__class__ = SparseLoraLinear
        # peft may drop the adapter name from the key; the adapter being loaded is then the layer's newest one
        layer.mark_sparse(adapter.lstrip(".") or list(layer.lora_A)[-1])
        incompatible_keys.unexpected_keys.remove(key)


def watch_adapter_loads(model) -> None:
    """Registers the hook once on `model` (called by `enable_compressed_save`, i.e. for every hf_prune model)."""
    if _restore_masked_layers not in model._load_state_dict_post_hooks.values():
        model.register_load_state_dict_post_hook(_restore_masked_layers)
