"""The values an S²FT adapter config may hold, and what they select on a model, following PEFT's rules.

``S2FTConfig`` checks its values here, and vLLM and the converter check a config file here before serving it, so a
config PEFT refuses (``"head_ratio": "lots"``) is refused everywhere with the same message. :func:`targets` and
:func:`pattern_units` follow PEFT's matching of ``target_modules`` and ``rank_pattern``-style keys
(``check_target_module_exists``, ``get_pattern_key``) for the fields S2FT has, so that code without PEFT can tell
which modules a config adapts and with how many units.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Optional

SELECTION_STRATEGIES = ("random", "weight", "activation", "weight_activation", "gradient")
# name in target_modules -> the parts of fused MoE experts it adapts (matched like module names: experts.down_proj)
EXPERT_TARGETS = {
    "down_proj": ("down_proj",),
    "gate_proj": ("gate_proj",),
    "up_proj": ("up_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
}
SELECTION_ORDERS = ("large", "small")
# S2FTConfig's own fields and their defaults: what a config file that omits a field means
DEFAULTS = {
    "target_modules": None,
    "exclude_modules": None,
    "layers_to_transform": None,
    "layers_pattern": None,
    "head_ratio": 0.125,
    "num_heads": None,
    "channel_ratio": 0.05,
    "num_channels": None,
    "selection": "random",
    "selection_order": "large",
    "seed": 42,
    "permute": None,
    "init_weights": True,
    "unit_pattern": None,
    "modules_to_save": None,
}


def with_defaults(config: Mapping) -> dict:
    """S2FT's fields of a config file's contents (``adapter_config.json``), with the default of each field it omits."""
    return {name: config.get(name, default) for name, default in DEFAULTS.items()}


def check_config_values(values: Mapping) -> None:
    """Raise a TypeError (wrong type) or ValueError (wrong value) naming the field, for S2FT's fields of ``values``."""
    _check_types(values)
    for name in ("head_ratio", "channel_ratio"):
        if not 0.0 < values[name] <= 1.0:
            raise ValueError(f"S2FTConfig.{name} must lie in (0, 1], got {values[name]!r}.")
    for name in ("num_heads", "num_channels"):
        if values[name] is not None and values[name] < 1:
            raise ValueError(f"S2FTConfig.{name} must be a positive int or None, got {values[name]!r}.")
    for key, count in (values["unit_pattern"] or {}).items():
        if count < 1:
            raise ValueError(f"S2FTConfig.unit_pattern gives {key!r} {count} units; counts must be positive.")
    _check_layer_selection(values)
    if values["selection"] not in SELECTION_STRATEGIES:
        raise ValueError(f"S2FTConfig.selection must be one of {SELECTION_STRATEGIES}, got {values['selection']!r}.")
    if values["selection_order"] not in SELECTION_ORDERS:
        raise ValueError(
            f"S2FTConfig.selection_order must be one of {SELECTION_ORDERS}, got {values['selection_order']!r}."
        )


def _check_types(values: Mapping) -> None:
    """Name the field when a value (often from a hand-edited adapter_config.json) has the wrong type."""
    def is_int(value):
        return isinstance(value, int) and not isinstance(value, bool)

    def is_names(value):
        return isinstance(value, str) or (
            isinstance(value, (list, set, tuple)) and all(isinstance(item, str) for item in value)
        )

    def is_ints(value):
        return is_int(value) or (isinstance(value, (list, tuple)) and all(is_int(item) for item in value))

    def is_counts(value):
        return isinstance(value, dict) and all(isinstance(k, str) and is_int(v) for k, v in value.items())

    expected = {
        "head_ratio": ("a number", lambda v: is_int(v) or isinstance(v, float)),
        "channel_ratio": ("a number", lambda v: is_int(v) or isinstance(v, float)),
        "num_heads": ("an int or null", lambda v: v is None or is_int(v)),
        "num_channels": ("an int or null", lambda v: v is None or is_int(v)),
        "selection": ("a string", lambda v: isinstance(v, str)),
        "selection_order": ("a string", lambda v: isinstance(v, str)),
        "seed": ("an int", is_int),
        "permute": ("true, false or null", lambda v: v is None or isinstance(v, bool)),
        "init_weights": ("true or false", lambda v: isinstance(v, bool)),
        "target_modules": ("a module name, a list of names or null", lambda v: v is None or is_names(v)),
        "exclude_modules": ("a module name, a list of names or null", lambda v: v is None or is_names(v)),
        "layers_to_transform": ("a layer index, a list of indices or null", lambda v: v is None or is_ints(v)),
        "layers_pattern": ("a name, a list of names or null", lambda v: v is None or is_names(v)),
        "unit_pattern": ("a mapping of module names to ints, or null", lambda v: v is None or is_counts(v)),
        "modules_to_save": ("a list of module names or null", lambda v: v is None or is_names(v)),
    }
    for name, (kind, accepts) in expected.items():
        value = values[name]
        if not accepts(value):
            raise TypeError(f"S2FTConfig.{name} must be {kind}, got {value!r} ({type(value).__name__}).")


def _check_layer_selection(values: Mapping) -> None:
    """The rules LoRA's config applies to ``layers_to_transform``/``layers_pattern``."""
    layers = values["layers_to_transform"]
    indices = [layers] if isinstance(layers, int) else layers or []
    if any(index < 0 for index in indices):
        raise ValueError(f"S2FTConfig.layers_to_transform must hold layer indices >= 0, got {indices}.")
    if isinstance(values["target_modules"], str) and (layers is not None or values["layers_pattern"]):
        raise ValueError(
            "S2FTConfig.layers_to_transform and layers_pattern cannot be used when target_modules is a regex "
            "string; put the layers into the regex, or give target_modules as a list of names."
        )
    if values["layers_pattern"] and layers is None:
        raise ValueError("S2FTConfig.layers_pattern needs layers_to_transform: the indices of the layers to adapt.")


def unit_count(values: Mapping, kind: str, total: int) -> int:
    """Selected units of one block: ``kind`` is ``"heads"`` or ``"channels"``, ``total`` the block's units."""
    if kind == "heads":
        exact, ratio = values["num_heads"], values["head_ratio"]
    else:
        exact, ratio = values["num_channels"], values["channel_ratio"]
    count = exact if exact is not None else max(1, round(ratio * total))
    if count > total:
        raise ValueError(f"S2FTConfig asks for {count} {kind} per block but the model has only {total}.")
    return count


def pattern_units(unit_pattern: Optional[Mapping], module_key: str) -> Optional[int]:
    """Units ``unit_pattern`` gives the module at ``module_key`` (None: the block's count applies); its keys match as
    LoRA's ``rank_pattern`` keys do (the first key that is the module's name or a regex of its dotted suffix)."""
    if not unit_pattern:
        return None
    key = next((key for key in unit_pattern if re.match(rf"(.*\.)?({key})$", module_key)), module_key)
    return unit_pattern.get(key)


def targets(values: Mapping, key: str) -> bool:
    """Whether the config adapts the module at ``key`` (PEFT's ``check_target_module_exists`` for S2FT's fields:
    ``exclude_modules``, ``modules_to_save``, ``target_modules`` as names or a regex, ``layers_to_transform`` with
    ``layers_pattern``). ``target_modules`` must be resolved (not None)."""
    exclude = values["exclude_modules"]
    if exclude:
        if isinstance(exclude, str):
            if re.fullmatch(exclude, key):
                return False
        elif key in exclude or any(key.endswith(f".{name}") for name in exclude):
            return False
    if any(re.match(rf"(^|.*\.){name}($|\..*)", key) for name in values["modules_to_save"] or ()):
        return False
    target_modules = values["target_modules"]
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, key) is not None
    if key in target_modules:
        return True  # a full module name: layers_to_transform does not apply (as in PEFT)
    if not any(key.endswith(f".{name}") for name in target_modules):
        return False
    layers = values["layers_to_transform"]
    if layers is None or (isinstance(layers, list) and not layers):
        return True
    patterns = values["layers_pattern"]
    match = None
    if not patterns:  # the first numbered segment is the layer index (not an expert index further in)
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        for pattern in [patterns] if isinstance(patterns, str) else patterns:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    if match is None:
        return False
    index = int(match["idx"])
    return index == layers if isinstance(layers, int) else index in layers
