"""Hotswapping an S2FT adapter in place, so that a ``torch.compile``'d model keeps its compiled code.

``peft.utils.hotswap.hotswap_adapter`` serves LoRA only (it refuses other PEFT types). An S2FT adapter with the same
modules and the same number of rows/columns per module (k) as the loaded one fits the same tensors: its deltas and
indices are copied into them, and every module keeps its shapes, so compiled code stays valid (it reads positions as
tensors, never as Python numbers). An adapter that lays out the model is re-laid out for its new units, in place.
"""

from __future__ import annotations

from typing import Optional

from peft.config import PeftConfig
from peft.utils.save_and_load import load_peft_weights, set_peft_model_state_dict

from .config import S2FTConfig
from .layer import S2FTLayer
from .transactions import adapter_load, weights_named


def hotswap_adapter(
    model, model_name_or_path: str, adapter_name: str = "default", torch_device: Optional[str] = None, **kwargs
) -> None:
    """Replace the weights and selection of ``adapter_name`` with those of the S2FT adapter at ``model_name_or_path``.

    ``model`` is a PeftModel, or ``torch.compile`` of one. The new adapter must adapt the same modules with the same k
    per module (e.g. the same base model, target modules and head/channel counts; units and seed may differ); it is
    checked as a load is (indices, shapes, finite deltas, no tensor without a place) before anything changes.
    ``kwargs`` go to the config and weight loaders (``subfolder``, ``revision``, ...).
    """
    from .model import S2FTModel

    peft_model = getattr(model, "_orig_mod", model)  # torch.compile wraps the module
    tuner = getattr(peft_model, "base_model", None)
    if not isinstance(tuner, S2FTModel):
        raise TypeError(f"hotswap_adapter expects a PeftModel with S2FT adapters, got {type(model).__name__}.")
    if adapter_name not in tuner.peft_config:
        raise ValueError(
            f"No S2FT adapter '{adapter_name}' to hotswap; loaded adapters: {sorted(tuner.peft_config)}."
        )
    layers = [layer for layer in tuner.model.modules()  # MoE experts too
              if isinstance(layer, S2FTLayer) and adapter_name in layer.s2ft_indices]
    if any(adapter_name in layer.merged_adapters for layer in layers):
        raise ValueError(
            f"Cannot hotswap adapter '{adapter_name}' while it is merged into the base weights; call "
            "`unmerge_adapter()` first."
        )
    peft_type = PeftConfig._get_peft_type(model_name_or_path, **_hub_kwargs(kwargs))
    if peft_type != "S2FT":
        raise ValueError(f"'{model_name_or_path}' holds a {peft_type} adapter; only S2FT adapters can be hotswapped here.")
    config = S2FTConfig.from_pretrained(model_name_or_path, **kwargs)
    current = tuner.peft_config[adapter_name]
    for field in ("modules_to_save", "trainable_token_indices"):
        if getattr(config, field, None) or getattr(current, field, None):
            raise ValueError(
                f"Cannot hotswap S2FT adapters with `{field}`: only S2FT deltas and indices are swapped in place."
            )
    if torch_device is None:  # where the adapter's tensors are
        torch_device = str(layers[0].s2ft_indices[adapter_name].device)
    with weights_named(model_name_or_path, kwargs):
        state_dict = load_peft_weights(model_name_or_path, device=torch_device, **kwargs)
    # the load checks every tensor against the loaded adapter's modules before copying anything in place
    with adapter_load():  # a load: ``permute`` is a preference
        set_peft_model_state_dict(peft_model, state_dict, adapter_name=adapter_name)
    for field, value in vars(config).items():  # in place: compiled code may hold the config object
        if field != "inference_mode":
            setattr(current, field, value)


def _hub_kwargs(kwargs: dict) -> dict:
    return {key: kwargs[key] for key in ("subfolder", "revision", "cache_dir", "token") if key in kwargs}
