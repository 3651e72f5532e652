"""Reading an S²FT adapter folder without building a model.

vLLM loads adapters in its workers, where a malformed folder must fail with a message that names the problem instead
of a shape error deep in a kernel. What needs only the folder is checked here: its files, the config's values (the
rules ``S2FTConfig`` applies, from ``s2ft_format``) and the tensors' names; the tensors themselves are checked against
the model they are served on (``vllm_ext.validation``, with the checks PEFT's loader makes).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from s2ft_format.config import check_config_values, with_defaults

from .experts import EXPERT_DELTAS, S2FTExperts

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."

# projection -> adapted side, as in s2ft_plugin.structure.PROJECTIONS (kept here so vLLM processes need not import PEFT)
SIDES = {
    "q_proj": "output",
    "k_proj": "output",
    "v_proj": "output",
    "gate_proj": "output",
    "up_proj": "output",
    "o_proj": "input",
    "down_proj": "input",
}
# vLLM's packed modules -> the projections in their slices, in slice order
PACKED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


class MalformedS2FTAdapter(ValueError):
    """The folder cannot be served as an S²FT adapter; the message says why."""


@dataclass(frozen=True)
class S2FTModule:
    """One adapted projection: ``W[:, indices] += delta`` (input side) or ``W[indices, :] += delta`` (output side),
    as saved (None: the tensor is missing); ``vllm_ext.validation`` checks them against the served model."""

    indices: torch.Tensor | None  # (k,) integers, original (unpermuted) coordinates
    delta: torch.Tensor | None  # (out_features, k) on the input side, (k, in_features) on the output side

    @property
    def k(self) -> int:
        return 0 if self.indices is None else self.indices.numel()


@dataclass(frozen=True)
class S2FTAdapter:
    path: str
    config: dict  # adapter_config.json (its S2FT values checked)
    modules: dict  # module path inside the base model (e.g. "model.layers.0.mlp.down_proj") -> S2FTModule
    experts: dict = field(default_factory=dict)  # path of fused MoE experts -> vllm_ext.experts.S2FTExperts

    @property
    def max_k(self) -> int:
        return max(module.k for module in [*self.modules.values(), *self.experts.values()])


def is_s2ft_folder(path: str) -> bool:
    """True when ``path`` holds an adapter config whose ``peft_type`` is S2FT (anything else is left to vLLM)."""
    try:
        with open(os.path.join(path, CONFIG_NAME)) as f:
            return json.load(f).get("peft_type") == "S2FT"
    except (OSError, ValueError, AttributeError):
        return False


def folder_state(path: str) -> tuple:
    """What identifies the contents of an adapter folder's files, (inode, size, modification time) of each, for
    remembering that a folder passed its checks (() when a file is missing)."""
    state = []
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        try:
            stat = os.stat(os.path.join(path, name))
        except OSError:
            return ()
        state.append((stat.st_ino, stat.st_size, stat.st_mtime_ns))
    return tuple(state)


def read_s2ft_adapter(path: str, config: dict | None = None) -> S2FTAdapter:
    """Load and check an S²FT folder; raise :class:`MalformedS2FTAdapter` naming the first problem found. ``config``:
    the folder's config as read and checked before (by a worker that remembers the folder): only the weights are read.
    """
    where = f"S2FT adapter at {path!r}"
    config = _read_config(path, where) if config is None else config
    weights = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        raise MalformedS2FTAdapter(f"{where}: {WEIGHTS_NAME} is missing.")
    try:
        # read into memory, not mapped: what the checks see is what the slots get, and vLLM's CPU cache of adapters
        # holds memory, not pages of a file that can be rewritten (or truncated) under it
        tensors = load_file(weights, backend="pread")
    except (SafetensorError, OSError) as error:
        raise MalformedS2FTAdapter(f"{where}: {WEIGHTS_NAME} is not a readable safetensors file ({error}).") from None

    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        module, _, kind = key.removeprefix(PREFIX).rpartition(".")
        if kind not in ("s2ft_indices", "s2ft_delta", *EXPERT_DELTAS.values()):
            raise MalformedS2FTAdapter(
                f"{where}: unexpected tensor {key!r}; an S2FT adapter holds only <module>.s2ft_indices and "
                "<module>.s2ft_delta, or on fused MoE experts their deltas (modules_to_save cannot be served through "
                "vLLM's LoRA API)."
            )
        grouped.setdefault(module, {})[kind] = tensor
    if not grouped:
        raise MalformedS2FTAdapter(f"{where}: {WEIGHTS_NAME} holds no tensors.")
    experts = {name: S2FTExperts(parts) for name, parts in grouped.items() if set(parts) & set(EXPERT_DELTAS.values())}
    modules = {name: S2FTModule(parts.get("s2ft_indices"), parts.get("s2ft_delta")) for name, parts in grouped.items()
               if name not in experts}
    return S2FTAdapter(path=path, config=config, modules=modules, experts=experts)


def _read_config(path: str, where: str) -> dict:
    try:
        with open(os.path.join(path, CONFIG_NAME)) as f:
            config = json.load(f)
    except OSError:
        raise MalformedS2FTAdapter(f"{where}: {CONFIG_NAME} is missing or unreadable.") from None
    except ValueError as error:
        raise MalformedS2FTAdapter(f"{where}: {CONFIG_NAME} is not valid JSON ({error}).") from None
    if not isinstance(config, dict) or config.get("peft_type") != "S2FT":
        raise MalformedS2FTAdapter(f"{where}: {CONFIG_NAME} does not declare peft_type 'S2FT'.")
    try:
        check_config_values(with_defaults(config))  # what S2FTConfig refuses when PEFT loads the folder
    except (TypeError, ValueError) as error:
        raise MalformedS2FTAdapter(f"{where}: {CONFIG_NAME}: {error}") from None
    return config
