"""Whether an S²FT adapter fits the model it is served on (or converted for): the checks PEFT's loader makes.

PEFT loads an adapter into the modules its config adapts on the base model and checks every module's tensors
(``s2ft_format.tensors``). Here the same modules come from the model's config instead of a built model: the config's
targets (PEFT's matching rules, ``s2ft_format.config``) over the Llama-style projections ``model.layers.<i>.
self_attn.<q/k/v/o>_proj`` and ``model.layers.<i>.mlp.<gate/up/down>_proj`` (on MoE models the fused experts
``model.layers.<i>.mlp.experts`` instead, ``vllm_ext.experts``), and the count of rows/columns each one selects. So
vLLM's front end and workers and the converter refuse exactly the adapters PEFT refuses (a deeper model's, an
incomplete one, a config PEFT cannot apply), with PEFT's messages; the front end checks a request's folder before it
is queued, because a worker that fails to load an adapter in the middle of a batch takes the engine down with it.
"""

from __future__ import annotations

from dataclasses import dataclass

from s2ft_format.config import pattern_units, targets, unit_count, with_defaults
from s2ft_format.tensors import check_delta, check_indices, check_present, stray_error

from .adapter import PACKED, SIDES, S2FTAdapter
from .capacity import check_capacity, engine_setting
from .experts import EXPERT_TARGETS, SERVED_MOE, adapted_experts, check_experts, has_experts

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
KEY_VALUE = ("k_proj", "v_proj")
# S2FT's default targets on Llama-style models (s2ft_plugin.architectures.default_target_modules)
DEFAULT_TARGETS = ("o_proj", "down_proj")
PACKED_IN = {projection: packed for packed, projections in PACKED.items() for projection in projections}


@dataclass(frozen=True)
class Projection:
    """A projection an adapter's config adapts, as the model's config gives it."""

    side: str  # "input": the delta adds to columns (o/down_proj); "output": to rows (q/k/v/gate/up_proj)
    out_features: int
    in_features: int
    unit_size: int  # rows/columns per selected unit: head_dim on attention projections, 1 on FFN projections
    count: int  # k: the rows/columns the config selects

    @property
    def axis_size(self) -> int:
        return self.in_features if self.side == "input" else self.out_features

    @property
    def delta_shape(self) -> tuple[int, int]:
        return (self.out_features, self.count) if self.side == "input" else (self.count, self.in_features)


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def adapted_projections(adapter_config: dict, config) -> dict[str, Projection]:
    """Module path -> projection, for every module an S²FT ``adapter_config`` (an ``adapter_config.json``'s contents)
    adapts on a model of ``config`` (a transformers config), in the model's order; raises what PEFT raises when the
    config cannot be applied to the model."""
    values = resolved_values(adapter_config)
    config = text_config(config)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    hidden, inter, group = config.hidden_size, config.intermediate_size, heads // kv_heads
    dims = {"q_proj": (heads * head_dim, hidden), "k_proj": (kv_heads * head_dim, hidden),
            "v_proj": (kv_heads * head_dim, hidden), "o_proj": (hidden, heads * head_dim),
            "gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    keys = [f"model.layers.{i}.{'self_attn' if name in ATTENTION else 'mlp'}.{name}"
            for i in range(config.num_hidden_layers) for name in dims
            if name in ATTENTION or not has_experts(config, i)]  # a layer with routed experts has no dense FFN
    projections = {}
    for key in filter(lambda key: targets(values, key), keys):
        name = key.rpartition(".")[2]
        units = pattern_units(values["unit_pattern"], key)
        if name in ATTENTION:
            available = kv_heads if name in KEY_VALUE else heads
            if units is not None and units > available:
                raise ValueError(f"S2FTConfig.unit_pattern gives '{key}' {units} units but it has only {available}.")
            query_heads = unit_count(values, "heads", heads) if units is None else units * (
                group if name in KEY_VALUE else 1)
            # query heads are selected group by group: they touch ceil(query_heads / group) key/value heads
            count = (-(-query_heads // group) if name in KEY_VALUE else query_heads) * head_dim
            unit_size = head_dim
        else:
            if units is not None and units > inter:
                raise ValueError(f"S2FTConfig.unit_pattern gives '{key}' {units} units but it has only {inter}.")
            count, unit_size = unit_count(values, "channels", inter) if units is None else units, 1
        projections[key] = Projection(SIDES[name], *dims[name], unit_size, count)
    _check_layers_exist(values, keys + [f"model.layers.{i}.mlp.experts.{name}" for i in range(config.num_hidden_layers)
                                        if has_experts(config, i) for name in EXPERT_TARGETS])
    return projections


def resolved_values(adapter_config: dict) -> dict:
    """S2FT's fields of an ``adapter_config``, with the default targets when it names none."""
    values = with_defaults(adapter_config)
    if values["target_modules"] is None:
        values["target_modules"] = DEFAULT_TARGETS
    return values


def _check_layers_exist(values: dict, keys: list[str]) -> None:
    """PEFT skips ``layers_to_transform`` indices that match no layer; S2FT refuses them (s2ft_plugin.model)."""
    requested = values["layers_to_transform"]
    if requested is None:
        return
    missing = [index for index in ([requested] if isinstance(requested, int) else requested)
               if not any(targets({**values, "layers_to_transform": [index]}, key) for key in keys)]
    if missing:
        raise ValueError(
            f"S2FTConfig.layers_to_transform names layer(s) {missing} but no target module of the model sits in a "
            f"layer with that index (layers_pattern={values['layers_pattern']!r})."
        )


def check_fits_model(adapter: S2FTAdapter, config) -> dict[str, Projection]:
    """Refuse an adapter PEFT's loader would refuse on a model of ``config``; return its modules' projections."""
    try:
        projections = adapted_projections(adapter.config, config)
        experts = adapted_experts(resolved_values(adapter.config), text_config(config))
    except ValueError as error:
        raise ValueError(f"S2FT adapter at {adapter.path!r}: {error}") from None
    for path, projection in projections.items():
        where = f"S2FT adapter at {adapter.path!r}, module {path!r}"
        module = adapter.modules.get(path)
        indices, delta = (None, None) if module is None else (module.indices, module.delta)
        check_present(where, indices, delta)
        check_indices(f"{where} ({projection.side}-side indices of a {projection.out_features}x"
                      f"{projection.in_features} projection)", indices, projection.axis_size, projection.unit_size,
                      projection.count)
        check_delta(where, delta, projection.delta_shape)
    for path, module in adapter.modules.items():
        if path not in projections:
            kind = "s2ft_indices" if module.indices is not None else "s2ft_delta"
            raise stray_error(f"S2FT adapter at {adapter.path!r}", f"{path}.{kind}")
    check_experts(adapter, experts)
    return projections


def check_servable(adapter: S2FTAdapter, config, target_modules=None, setting: str | None = None
                   ) -> dict[str, Projection]:
    """Refuse an adapter the engine serving a model of ``config`` (a transformers config) with LoRA restricted to
    ``target_modules`` (``--lora-target-modules``, None: all) and S2FT buffers sized by ``setting`` (a
    ``VLLM_S2FT_MAX_K`` value; None: ``vllm_ext.capacity.engine_setting()``) would refuse; return its modules'
    projections."""
    if adapter.experts:
        check_experts_served(f"S2FT adapter at {adapter.path!r}, module {next(iter(adapter.experts))!r}", config)
    projections = check_fits_model(adapter, config)
    check_capacity(adapter, engine_setting() if setting is None else setting)
    for path in [*projections, *adapter.experts]:
        projection = path.rpartition(".")[2]
        if target_modules is not None and not {projection, *_packed_names(projection)} & set(target_modules):
            raise ValueError(f"S2FT adapter at {adapter.path!r}, module {path!r}: the engine serves LoRA only on "
                             f"--lora-target-modules {sorted(target_modules)}.")
    return projections


def check_experts_served(where: str, config) -> None:
    """Refuse S2FT on fused experts where the engine does not serve it: off CPU, and on MoE models it was not
    tested on."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        raise ValueError(
            f"{where}: S2FT deltas on fused MoE experts are served on vLLM's CPU platform only (vllm_ext.moe adds them "
            "beside vLLM's CPU experts kernel); on this platform serve the merged model (PeftModel.merge_and_unload) "
            "instead."
        )
    if text_config(config).model_type not in SERVED_MOE:
        raise ValueError(f"{where}: S2FT deltas on fused MoE experts are served on {', '.join(SERVED_MOE)} models, "
                         f"not {text_config(config).model_type!r}; serve the merged model instead.")


def _packed_names(projection: str) -> tuple[str, ...]:
    """vLLM wraps a packed layer when any of its names is a target: the packed name and its slices' projections."""
    packed = PACKED_IN.get(projection)
    return (packed, *PACKED[packed]) if packed else ()
