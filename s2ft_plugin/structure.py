"""Coupled structure of transformer blocks: which rows and columns of which tensors belong to a head or channel.

An attention block's unit is a query head: it owns ``head_dim`` rows of the query projection and columns of the output
projection, and shares its key/value head (rows of the key and value projections) with the other query heads of its
group. An FFN block's unit is a channel: one row of the gate and up projections and one column of the down projection.
Model families name these projections differently and some fuse them (``architectures.py``); here every projection has
a *role*, and a fused projection is a list of sections, each the rows of one role in the fused weight. Some attention
blocks keep per-head state beside the projections (OLMo2's q/k norms over all heads, Cohere's per-head norms, GPT-OSS
attention sinks); it follows its heads.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .architectures import Architecture, architecture, head_geometry, linear_shape

# role -> (block kind, adapted side, unit axis it indexes; "fused" for a projection holding several roles' rows)
ROLES = {
    "q": ("heads", "output", "query"),
    "k": ("heads", "output", "key_value"),
    "v": ("heads", "output", "key_value"),
    "qkv": ("heads", "output", "fused"),
    "o": ("heads", "input", "query"),
    "gate": ("channels", "output", "channel"),
    "up": ("channels", "output", "channel"),
    "gate_up": ("channels", "output", "fused"),
    "down": ("channels", "input", "channel"),
}
# the role whose weight and input define a unit's scores: the input side of each block
SCORING_ROLE = {"heads": "o", "channels": "down"}
# sets of roles that make a block complete: co-permuting them (and the block's per-head state) preserves the function
COMPLETE = {"heads": ({"q", "k", "v", "o"}, {"qkv", "o"}),
            "channels": ({"gate", "up", "down"}, {"gate_up", "down"}, {"up", "down"})}
# per-head state beside the projections (first name of its path in the block) -> the unit axis it follows
PER_HEAD_STATE = {"q_norm": "query", "k_norm": "key_value", "sinks": "query"}


@dataclass(frozen=True)
class CoupledTensor:
    """A tensor beside the projections whose dim 0 indexes the block's heads (``per_unit``) or their rows."""

    path: str  # path of the tensor relative to the model, e.g. "model.layers.0.self_attn.q_norm.weight"
    axis: str  # "query" or "key_value"
    per_unit: bool


@dataclass(frozen=True, eq=False)
class Block:
    """One attention or FFN block: its unit geometry and the paths of its projections (relative to the model)."""

    name: str
    kind: str  # "heads" or "channels"
    num_units: int  # query heads or FFN channels
    unit_size: int  # head_dim for heads, 1 for channels
    group_size: int  # query heads per key/value head, 1 for channels
    projections: dict  # role -> module path
    qkv_layout: str = "sections"  # how a fused qkv projection orders its rows (see architectures.Architecture)
    coupled: tuple = ()  # CoupledTensor entries: per-head state that moves with the heads
    layout_blocker: Optional[str] = None  # why the block's weights cannot be co-permuted (None: they can)

    @property
    def key(self) -> str:
        """Unique per block (a Gemma-style layer could hold both kinds under one name)."""
        return f"{self.name}:{self.kind}"

    def role(self, path: str) -> str:
        return next(role for role, projection_path in self.projections.items() if projection_path == path)

    @staticmethod
    def side(role: str) -> str:
        return ROLES[role][1]

    def axis_units(self, axis: str) -> int:
        return self.num_units // self.group_size if axis == "key_value" else self.num_units

    def sections(self, role: str) -> list[tuple[str, torch.Tensor]]:
        """(unit axis, rows of the projection's indexed dim holding that axis's rows in order) for each section."""
        axis = ROLES[role][2]
        if axis != "fused":
            return [(axis, torch.arange(self.axis_units(axis) * self.unit_size))]
        if role == "gate_up":  # [gate | up]
            return [("channel", torch.arange(self.num_units)), ("channel", self.num_units + torch.arange(self.num_units))]
        heads, groups, size, per_group = self.num_units, self.num_units // self.group_size, self.unit_size, self.group_size
        q, kv = torch.arange(heads * size), torch.arange(groups * size)
        if self.qkv_layout == "sections":  # [q | k | v]
            return [("query", q), ("key_value", heads * size + kv), ("key_value", (heads + groups) * size + kv)]
        if self.qkv_layout == "per_head":  # [q_h k_h v_h] for each head (one key/value head per query head)
            head, offset = q // size, q % size
            return [(axis, head * 3 * size + part * size + offset) for part, axis in
                    enumerate(("query", "key_value", "key_value"))]
        # "per_group": [q_(g,0) ... q_(g,G-1) k_g v_g] for each key/value group g
        head, offset = q // size, q % size
        group_start = (head // per_group) * (per_group + 2) * size
        q_rows = group_start + (head % per_group) * size + offset
        group, kv_offset = kv // size, kv % size
        k_rows = group * (per_group + 2) * size + per_group * size + kv_offset
        return [("query", q_rows), ("key_value", k_rows), ("key_value", k_rows + size)]

    def axis_size(self, role: str) -> int:
        return sum(rows.numel() for _, rows in self.sections(role))

    def elements(self, role: str, units: torch.Tensor) -> torch.Tensor:
        """Rows (output side) or columns (input side) of ``role``'s projection owned by the given sorted units."""
        return torch.cat([rows[self._axis_elements(axis, units)] for axis, rows in self.sections(role)])

    def _axis_elements(self, axis: str, units: torch.Tensor) -> torch.Tensor:
        if axis == "key_value":
            units = torch.unique(units // self.group_size)
        return self._expand(units)

    def units_from_elements(self, role: str, elements: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`elements` (key/value rows stand for every query head of their groups)."""
        axis, rows = self.sections(role)[0]
        position = torch.full((int(rows.max()) + 1,), -1, dtype=torch.long)
        position[rows] = torch.arange(rows.numel())
        local = position[elements[elements <= rows.max()]]
        local = local[local >= 0]
        units = local[:: self.unit_size] // self.unit_size
        if axis == "key_value":
            units = (units[:, None] * self.group_size + torch.arange(self.group_size)).flatten()
        return units

    def permutation(self, axis: str, unit_perm: torch.Tensor, per_unit: bool = False) -> torch.Tensor:
        """Expand a permutation of query heads (or channels) to the units (``per_unit``) or rows/columns of ``axis``."""
        if axis == "key_value":
            unit_perm = unit_perm[:: self.group_size] // self.group_size
        return unit_perm.long() if per_unit else self._expand(unit_perm)

    def index_permutation(self, role: str, unit_perm: torch.Tensor) -> torch.Tensor:
        """The permutation of ``role``'s indexed dim that moves every section's rows with their units."""
        result = torch.arange(self.axis_size(role))
        for axis, rows in self.sections(role):
            result[rows] = rows[self.permutation(axis, unit_perm)]
        return result

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


def text_config(model: nn.Module):
    config = getattr(model, "config", None)
    if config is None:
        raise ValueError("S2FT needs a transformers model with a `config` to know its heads and head_dim.")
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def projection_role(model: nn.Module, module_path: str) -> str:
    """The role of ``module_path`` in ``model``'s family; refuse modules whose units S2FT cannot name."""
    arch = architecture(text_config(model))
    role = arch.role(module_path)
    if role is None:
        raise ValueError(
            f"S2FT cannot target '{module_path}': in a {text_config(model).model_type} model it adapts the attention "
            f"and FFN projections whose heads or channels it can select: {', '.join(sorted(arch.names))}."
        )
    return role


def find_block(model: nn.Module, module_path: str) -> Block:
    """The block that ``module_path`` (a projection path relative to ``model``) belongs to."""
    config = text_config(model)
    arch = architecture(config)
    kind = ROLES[projection_role(model, module_path)][0]
    block_name = module_path.rsplit(".", 1)[0] if "." in module_path else ""
    block_module = model.get_submodule(block_name) if block_name else model
    projections = {}
    for child_name, _ in block_module.named_children():
        path = f"{block_name}.{child_name}" if block_name else child_name
        role = arch.role(path)
        if role is not None and ROLES[role][0] == kind:
            projections[role] = path
    if kind == "heads":
        heads, kv_heads, head_dim = head_geometry(config, arch)
        geometry = dict(num_units=heads, unit_size=head_dim, group_size=heads // kv_heads)
    else:
        role = "down" if "down" in projections else next(iter(projections))
        out_features, in_features = linear_shape(model.get_submodule(projections[role]))
        channels = {"down": in_features, "gate_up": out_features // 2}.get(role, out_features)
        geometry = dict(num_units=channels, unit_size=1, group_size=1)
    block = Block(name=block_name, kind=kind, projections=projections, qkv_layout=arch.qkv_layout, **geometry)
    _check_shapes(model, block)
    coupled, blocker = _coupled_state(block, block_module, arch)
    return Block(name=block_name, kind=kind, projections=projections, qkv_layout=arch.qkv_layout, coupled=coupled,
                 layout_blocker=blocker, **geometry)


def _coupled_state(block: Block, block_module: nn.Module, arch: Architecture) -> tuple[tuple, Optional[str]]:
    """Per-head state that moves with the heads, and why the block cannot be co-permuted (None if it can).

    A block can be co-permuted only when every tensor that indexes its units is known: its projections form a complete
    set, and any other tensor of the block with a dimension of the units' sizes is per-head state S2FT knows.
    """
    where = f"block '{block.name}'"
    if block.kind == "heads" and arch.head_order_fixed:
        return (), f"{where} cannot reorder its heads: {arch.head_order_fixed}"
    if not any(roles <= set(block.projections) for roles in COMPLETE[block.kind]):
        names = " or ".join("/".join(sorted(roles)) for roles in COMPLETE[block.kind])
        found = ", ".join(path.rsplit(".", 1)[-1] for path in block.projections.values())
        return (), f"{where} has only {found} of the projections S2FT moves together ({names} roles)"
    sizes = {block.axis_units(axis) * size for axis in ("query", "key_value") for size in (1, block.unit_size)}
    projection_paths = {path.rsplit(".", 1)[-1] + "." for path in block.projections.values()}
    other_blocks = {name + "." for name, child in block_module.named_children()
                    if any(arch.role(f"{name}.{grandchild}") for grandchild, _ in child.named_children())}
    if block.kind == "heads":
        heads = {block.num_units, block.axis_units("key_value")}
        for name, child in block_module.named_modules():
            if (isinstance(child, nn.ModuleList) and len(child) in heads
                    and (name.split(".", 1)[0] + ".") not in projection_paths | other_blocks):
                path = f"{block.name}.{name}" if block.name else name
                return (), f"{where} holds '{path}', one module per head, which S2FT does not move with its heads"
    coupled = []
    for name, tensor in [*block_module.named_parameters(), *block_module.named_buffers()]:
        head = name.split(".", 1)[0]
        if (head + ".") in projection_paths | other_blocks or "rotary" in head:
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


def _check_shapes(model: nn.Module, block: Block) -> None:
    for role, path in block.projections.items():
        out_features, in_features = linear_shape(model.get_submodule(path))
        size = out_features if block.side(role) == "output" else in_features
        if size != block.axis_size(role):
            raise ValueError(
                f"'{path}' has {size} {'rows' if block.side(role) == 'output' else 'columns'} but the model config "
                f"implies {block.axis_size(role)} ({block.num_units} units x {block.unit_size}); S2FT cannot map its "
                "heads or channels."
            )
