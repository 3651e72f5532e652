"""Coupled structure of transformer blocks: which rows and columns of which tensors belong to a head or channel.

An attention block's unit is a query head: it owns ``head_dim`` rows of q_proj and columns of o_proj, and shares its
key/value head (rows of k_proj and v_proj) with the other query heads of its group. An FFN block's unit is a channel:
one row of gate_proj and up_proj and one column of down_proj. Some attention blocks keep per-head state beside the
projections (OLMo2's q/k norms over all heads, Cohere's per-head norms, GPT-OSS attention sinks); it follows its heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

# projection name -> (block kind, adapted side, unit axis it indexes)
PROJECTIONS = {
    "q_proj": ("heads", "output", "query"),
    "k_proj": ("heads", "output", "key_value"),
    "v_proj": ("heads", "output", "key_value"),
    "o_proj": ("heads", "input", "query"),
    "gate_proj": ("channels", "output", "channel"),
    "up_proj": ("channels", "output", "channel"),
    "down_proj": ("channels", "input", "channel"),
}
# the projection whose weight and input define a unit's scores: the input side of each block
SCORING_PROJECTION = {"heads": "o_proj", "channels": "down_proj"}
FUSED_PROJECTIONS = ("qkv_proj", "gate_up_proj", "W_pack", "query_key_value", "c_attn", "c_fc")
# what a block needs so that co-permuting its projections preserves the model's function
REQUIRED_PROJECTIONS = {"heads": ("q_proj", "k_proj", "v_proj", "o_proj"), "channels": ("down_proj",)}
# per-head state beside the projections (first name of its path in the block) -> the unit axis it follows
PER_HEAD_STATE = {"q_norm": "query", "k_norm": "key_value", "sinks": "query"}


@dataclass(frozen=True)
class CoupledTensor:
    """A tensor beside the projections whose dim 0 indexes the block's heads (``per_unit``) or their rows."""

    path: str  # path of the tensor relative to the model, e.g. "model.layers.0.self_attn.q_norm.weight"
    axis: str  # "query" or "key_value"
    per_unit: bool


@dataclass(frozen=True)
class Block:
    """One attention or FFN block: its unit geometry and the paths of its projections (relative to the model)."""

    name: str
    kind: str  # "heads" or "channels"
    num_units: int  # query heads or FFN channels
    unit_size: int  # head_dim for heads, 1 for channels
    group_size: int  # query heads per key/value head, 1 for channels
    projections: dict  # projection name -> module path
    coupled: tuple = ()  # CoupledTensor entries: per-head state that moves with the heads
    layout_blocker: Optional[str] = None  # why the block's weights cannot be co-permuted (None: they can)

    @property
    def key(self) -> str:
        """Unique per block (a Gemma-style layer could hold both kinds under one name)."""
        return f"{self.name}:{self.kind}"

    def axis(self, projection: str) -> str:
        return PROJECTIONS[projection][2]

    def side(self, projection: str) -> str:
        return PROJECTIONS[projection][1]

    def elements(self, projection: str, units: torch.Tensor) -> torch.Tensor:
        """Rows (output side) or columns (input side) of ``projection`` owned by the given sorted units."""
        if self.axis(projection) == "key_value":
            units = torch.unique(units // self.group_size)
        return self._expand(units)

    def units_from_elements(self, projection: str, elements: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`elements` (key/value rows stand for every query head of their groups)."""
        units = elements[:: self.unit_size] // self.unit_size
        if self.axis(projection) == "key_value":
            units = (units[:, None] * self.group_size + torch.arange(self.group_size)).flatten()
        return units

    def axis_size(self, projection: str) -> int:
        return self.axis_units(self.axis(projection)) * self.unit_size

    def axis_units(self, axis: str) -> int:
        return self.num_units // self.group_size if axis == "key_value" else self.num_units

    def permutation(self, axis: str, unit_perm: torch.Tensor, per_unit: bool = False) -> torch.Tensor:
        """Expand a permutation of query heads (or channels) to the units (``per_unit``) or rows/columns of ``axis``."""
        if axis == "key_value":
            unit_perm = unit_perm[:: self.group_size] // self.group_size
        return unit_perm.long() if per_unit else self._expand(unit_perm)

    def _expand(self, units: torch.Tensor) -> torch.Tensor:
        offsets = torch.arange(self.unit_size, dtype=torch.long)
        return (units.long()[:, None] * self.unit_size + offsets).flatten()

    def contiguous_order(self, units: torch.Tensor) -> torch.Tensor:
        """A group-preserving permutation of the units that puts the selected ones first.

        Full key/value groups come first, then the group holding the remainder (selected heads first), then the rest,
        so a group-aligned selection (see ``selection.select_units``) ends up contiguous.
        """
        selected = torch.zeros(self.num_units, dtype=torch.bool)
        selected[units] = True
        per_group = selected.view(-1, self.group_size)
        counts = per_group.sum(1)
        # full groups, then partial ones, then untouched ones; ties keep the original order
        group_rank = torch.where(counts == self.group_size, 0, torch.where(counts > 0, 1, 2))
        group_order = torch.argsort(group_rank * per_group.shape[0] + torch.arange(per_group.shape[0]))
        heads = torch.arange(self.num_units).view(-1, self.group_size)
        within = torch.argsort((~per_group).long() * self.group_size + torch.arange(self.group_size), dim=1)
        return torch.gather(heads, 1, within)[group_order].flatten()


def _text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("S2FT needs a transformers model with a `config` to know its heads and head_dim.")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def projection_name(module_path: str) -> str:
    return module_path.rsplit(".", 1)[-1]


def check_projection(module_path: str) -> None:
    """Refuse modules whose units S2FT cannot name, with the reason."""
    name = projection_name(module_path)
    if name in FUSED_PROJECTIONS:
        raise ValueError(
            f"S2FT cannot target the fused projection '{module_path}': its rows mix several projections. Target the "
            "unfused projections (o_proj, down_proj), or use a model with split projections."
        )
    if name not in PROJECTIONS:
        raise ValueError(
            f"S2FT cannot target '{module_path}': it adapts attention projections (q_proj, k_proj, v_proj, o_proj) and "
            "FFN projections (gate_proj, up_proj, down_proj) whose heads or channels it can select."
        )


def find_block(model: nn.Module, module_path: str) -> Block:
    """The block that ``module_path`` (a projection path relative to ``model``) belongs to."""
    check_projection(module_path)
    kind = PROJECTIONS[projection_name(module_path)][0]
    block_name = module_path.rsplit(".", 1)[0] if "." in module_path else ""
    block_module = model.get_submodule(block_name) if block_name else model
    projections = {}
    for child_name, _ in block_module.named_children():
        path = f"{block_name}.{child_name}" if block_name else child_name
        if child_name in PROJECTIONS and PROJECTIONS[child_name][0] == kind:
            projections[child_name] = path
    config = _text_config(model)
    if kind == "heads":
        num_heads = config.num_attention_heads
        num_kv_heads = getattr(config, "num_key_value_heads", None) or num_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // num_heads
        if num_heads % num_kv_heads:
            raise ValueError(f"{num_heads} attention heads do not split into {num_kv_heads} key/value groups.")
        geometry = dict(num_units=num_heads, unit_size=head_dim, group_size=num_heads // num_kv_heads)
    else:
        down = projections.get("down_proj") or projections.get("gate_proj") or projections.get("up_proj")
        weight_shape = _linear_shape(model.get_submodule(down))
        channels = weight_shape[1] if down.endswith("down_proj") else weight_shape[0]
        geometry = dict(num_units=channels, unit_size=1, group_size=1)
    block = Block(name=block_name, kind=kind, projections=projections, **geometry)
    _check_shapes(model, block)
    coupled, blocker = _coupled_state(block, block_module)
    return Block(name=block_name, kind=kind, projections=projections, coupled=coupled, layout_blocker=blocker,
                 **geometry)


def _coupled_state(block: Block, block_module: nn.Module) -> tuple[tuple, Optional[str]]:
    """Per-head state that moves with the heads, and why the block cannot be co-permuted (None if it can).

    A block can be co-permuted only when every tensor that indexes its units is known: its projections are complete
    and unfused, and any other tensor of the block with a dimension of the units' sizes is per-head state S2FT knows.
    """
    where = f"block '{block.name}'"
    fused = [name for name, _ in block_module.named_children() if name in FUSED_PROJECTIONS]
    if fused:
        return (), f"{where} holds the fused projection '{block.name}.{fused[0]}'"
    missing = [name for name in REQUIRED_PROJECTIONS[block.kind] if name not in block.projections]
    if block.kind == "channels" and not ({"gate_proj", "up_proj"} & set(block.projections)):
        missing.append("gate_proj/up_proj")
    if missing:
        required = "/".join(REQUIRED_PROJECTIONS[block.kind])
        return (), f"{where} has no {', '.join(missing)} (S2FT moves {required} together)"
    sizes = {block.axis_units(axis) * size for axis in ("query", "key_value") for size in (1, block.unit_size)}
    coupled = []
    for name, tensor in [*block_module.named_parameters(), *block_module.named_buffers()]:
        head = name.split(".", 1)[0]
        if head in block.projections or "rotary" in head:
            continue
        path = f"{block.name}.{name}" if block.name else name
        axis = PER_HEAD_STATE.get(head) if block.kind == "heads" else None
        if axis is not None:
            if tensor.dim() == 1 and tensor.numel() == block.unit_size:
                continue  # one head's worth, shared by all heads (Qwen3/Gemma3 q_norm)
            units = block.axis_units(axis)
            if tensor.dim() == 1 and tensor.shape[0] == units * block.unit_size:
                coupled.append(CoupledTensor(path, axis, per_unit=False))
                continue
            if tensor.dim() >= 1 and tensor.shape[0] == units:
                coupled.append(CoupledTensor(path, axis, per_unit=True))
                continue
        if any(dim in sizes for dim in tensor.shape):
            shape = tuple(tensor.shape)
            return (), f"{where} holds '{path}' {shape}, which S2FT does not know how to move with its units"
    return tuple(coupled), None


def _linear_shape(module: nn.Module) -> tuple[int, int]:
    base = module.get_base_layer() if hasattr(module, "get_base_layer") else module
    out_features, in_features = getattr(base, "out_features", None), getattr(base, "in_features", None)
    if out_features is None or in_features is None:
        raise ValueError(f"S2FT supports linear projections only, got {type(base).__name__}.")
    return out_features, in_features


def _check_shapes(model: nn.Module, block: Block) -> None:
    for name, path in block.projections.items():
        out_features, in_features = _linear_shape(model.get_submodule(path))
        size = out_features if block.side(name) == "output" else in_features
        if size != block.axis_size(name):
            raise ValueError(
                f"'{path}' has {size} {'rows' if block.side(name) == 'output' else 'columns'} but the model config "
                f"implies {block.axis_size(name)} ({block.num_units} units x {block.unit_size}); S2FT cannot map its "
                "heads or channels."
            )
