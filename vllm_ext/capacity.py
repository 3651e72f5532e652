"""How many rows/columns (k) the engine's S²FT buffers hold per projection.

S²FT slots have buffers of their own, sized when the engine starts (CUDA graphs capture their addresses), so k is
independent of ``--max-lora-rank``. Every vLLM process (the front end checks requests, the workers size their buffers
and check what they load) takes the sizes from, in this order:

1. ``VLLM_S2FT_MAX_K`` in the environment, an override: an integer, e.g. ``1024``, for every projection S²FT can
   adapt, or ``projection=k`` pairs, e.g. ``o_proj=256,down_proj=1024,q_proj=64``, for only the projections named;
2. else, for a server started with S²FT adapters in ``--lora-modules``, the sizes those adapters need: every projection
   they adapt, with their largest k rounded up to a multiple of ``ROUNDING``, and at least ``DEFAULT`` for adapters
   loaded later. The plugin works them out in the front end when it turns the command line into the engine's
   arguments (:func:`sized_from_adapters`) and hands them to the engine core and workers in the engine config's
   ``additional_config`` (key ``SIZED``), which every process receives and which is part of vLLM's compile-cache key;
3. else ``DEFAULT``, ``o_proj=512,down_proj=512``: the projections S²FT adapts by default.

A slot costs ``k x (dense size of the projection)`` elements of the LoRA dtype per adapted layer and projection (on
tensor-parallel ranks, the local part of it), whether or not the adapter in it uses them.
"""

from __future__ import annotations

import os

from safetensors import safe_open

from .adapter import PREFIX, SIDES, WEIGHTS_NAME, S2FTAdapter, is_s2ft_folder

SETTING = "VLLM_S2FT_MAX_K"
DEFAULT = "o_proj=512,down_proj=512"
SIZED = "s2ft_max_k"  # additional_config key: the sizes worked out from the --lora-modules adapters
# k sized from adapters is rounded up to this: adapters of one recipe on one model share k, so exact sizes serve them;
# rounding leaves room for a slightly wider one (a few more channels) at a bounded cost (at most 63 x the dense size
# per slot, layer and projection); 64 is a multiple of the CPU grouped GEMM's alignment and of the GPU kernels' tiles
ROUNDING = 64


def engine_setting(sized: str | None = None) -> str:
    """The setting an engine's buffers follow: ``VLLM_S2FT_MAX_K`` when set, else ``sized`` (what the plugin worked
    out from the adapters given at start-up), else ``DEFAULT``."""
    value = os.environ.get(SETTING)
    return value if value is not None else sized if sized is not None else DEFAULT


def max_k_per_projection(value: str) -> dict[str, int]:
    """projection name -> the k its buffers hold (0: no buffers), from a setting's value."""
    text = value.strip()
    if text.isdigit():
        return dict.fromkeys(SIDES, int(text))
    limits = dict.fromkeys(SIDES, 0)
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, _, k = item.partition("=")
        name, k = name.strip(), k.strip()
        if name not in SIDES or not k.isdigit():
            raise ValueError(
                f"{SETTING}={value!r}: expected an integer or comma-separated projection=k pairs with projections "
                f"from {sorted(SIDES)} (e.g. 'o_proj=256,down_proj=1024'); {item!r} is neither."
            )
        limits[name] = int(k)
    return limits


def _format(limits: dict[str, int]) -> str:
    return ",".join(f"{name}={k}" for name, k in limits.items() if k)


def sized_from_adapters(paths) -> str | None:
    """The setting that serves the S²FT folders among ``paths`` (absolute adapter folders given at start-up) and, for
    adapters loaded later, ``DEFAULT``: per projection the larger of the default and the adapters' largest k rounded
    up to ``ROUNDING``. None when no path is an S²FT folder. Only the weights' header is read (the shapes of the index
    tensors); a folder that cannot be read is left out here and refused with its reason when the server loads it."""
    limits, found = max_k_per_projection(DEFAULT), False
    for path in filter(is_s2ft_folder, paths):
        try:
            with safe_open(os.path.join(path, WEIGHTS_NAME), "pt") as weights:
                shapes = {key: weights.get_slice(key).get_shape() for key in weights.keys()}
        except Exception:  # safetensors raises several types for unreadable files; the load names the problem
            continue
        found = True
        for key, shape in shapes.items():
            module, _, kind = key.removeprefix(PREFIX).rpartition(".")
            projection = module.rpartition(".")[2]
            if kind == "s2ft_indices" and projection in limits and len(shape) == 1:
                limits[projection] = max(limits[projection], -(-shape[0] // ROUNDING) * ROUNDING)
    return _format(limits) if found else None


def check_capacity(adapter: S2FTAdapter, setting: str) -> None:
    """Refuse an adapter that selects more rows/columns in a projection than buffers sized by ``setting`` hold, naming
    the value of ``VLLM_S2FT_MAX_K`` that serves it."""
    limits = max_k_per_projection(setting)
    needed = dict(limits)
    for path, module in adapter.modules.items():
        projection = path.rpartition(".")[2]
        needed[projection] = max(needed[projection], module.k)
    if needed == limits:
        return
    path, module = next((path, module) for path, module in adapter.modules.items()
                        if module.k > limits[path.rpartition(".")[2]])
    projection = path.rpartition(".")[2]
    if SETTING in os.environ:
        origin = f"{SETTING}={setting!r}"
    elif setting == DEFAULT:
        origin = f"the default, {SETTING} being unset"
    else:
        origin = f"the S2FT adapters given at start-up (--lora-modules) and the default {DEFAULT}, {SETTING} unset"
    raise ValueError(
        f"S2FT adapter at {adapter.path!r}, module {path!r}: selects {module.k} "
        f"{'columns' if SIDES[projection] == 'input' else 'rows'} but the engine's S2FT buffers hold k <= "
        f"{limits[projection]} for {projection}; restart it with {SETTING}='{_format(needed)}' (or more). Its buffers "
        f"were sized from {origin}."
    )
