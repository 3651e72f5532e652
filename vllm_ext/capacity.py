"""How many rows/columns (k) the engine's S²FT buffers hold per projection: the ``VLLM_S2FT_MAX_K`` setting.

S²FT slots have buffers of their own, sized when the engine starts (CUDA graphs capture their addresses), so k is
independent of ``--max-lora-rank``. The setting is read from the environment by every vLLM process (the front end
checks requests with it, the workers size their buffers with it):

- unset: ``o_proj=512,down_proj=512``, the projections S²FT adapts by default;
- an integer, e.g. ``1024``: that k for every projection S²FT can adapt;
- ``projection=k`` pairs, e.g. ``o_proj=256,down_proj=1024,q_proj=64``: only the projections named get buffers.

A slot costs ``k x (dense size of the projection)`` elements of the LoRA dtype per adapted layer and projection (on
tensor-parallel ranks, the local part of it), whether or not the adapter in it uses them.
"""

from __future__ import annotations

import os

from .adapter import SIDES, S2FTAdapter

SETTING = "VLLM_S2FT_MAX_K"
DEFAULT = "o_proj=512,down_proj=512"


def max_k_per_projection(value: str | None = None) -> dict[str, int]:
    """projection name -> the k its buffers hold (0: no buffers), from ``value`` or the environment."""
    value = os.environ.get(SETTING, DEFAULT) if value is None else value
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


def check_capacity(adapter: S2FTAdapter, limits: dict[str, int]) -> None:
    """Refuse an adapter that selects more rows/columns in a projection than the engine's buffers hold, naming the
    setting that serves it."""
    needed = dict(limits)
    for path, module in adapter.modules.items():
        projection = path.rpartition(".")[2]
        needed[projection] = max(needed[projection], module.k)
    if needed == limits:
        return
    path, module = next((path, module) for path, module in adapter.modules.items()
                        if module.k > limits[path.rpartition(".")[2]])
    projection = path.rpartition(".")[2]
    setting = ",".join(f"{name}={k}" for name, k in needed.items() if k)
    raise ValueError(
        f"S2FT adapter at {adapter.path!r}, module {path!r}: selects {module.k} "
        f"{'columns' if SIDES[projection] == 'input' else 'rows'} but the engine's S2FT buffers hold k <= "
        f"{limits[projection]} for {projection}; restart it with {SETTING}='{setting}' (or more)."
    )
