"""S²FT on the fused experts of mixture-of-experts blocks.

transformers 5 keeps a block's experts as 3-D parameters: ``gate_up_proj`` (E, 2I, H) and ``down_proj`` (E, H, I), or
transposed, (E, H, 2I) and (E, I, H) (Llama 4, GPT-OSS), with each expert's gate and up rows concatenated or
interleaved. A channel of an expert couples a column of its down_proj with its gate row and its up row, as in a dense
FFN; every expert has its own channels. ``target_modules`` name the parts to adapt as for dense FFNs: ``down_proj``
(columns, the input side), ``gate_proj`` and ``up_proj`` (rows; ``gate_up_proj`` names both).

The frozen experts run their own forward, through whichever ``experts_implementation`` the model uses. Beside it each
adapted expert adds, for the tokens routed to it, a correction computed on its selected channels ``S`` only::

    out += w * ((g(x W'ᵀ) - g(x Wᵀ)) W_down[:, S]ᵀ + g(x W'ᵀ) D_downᵀ),   W = W_gu[S],  W' = W + D_gu

(``g``: the experts' gated activation, ``w``: the routing weight): exactly what the merged experts compute, and
exactly zero for zero deltas. Partial backprop: the correction saves the selected channels' gate/up pre-activations
(2k values per routed token) and, only when gate/up rows train, the experts' input; the router and the base weights
get no gradient.

Experts are not co-permuted: they read their k gate/up rows and down columns straight from the weights (k x H values
per expert and step), never a wide activation, so a contiguous layout would only turn that small gather into a view.
"""

from __future__ import annotations

import inspect
import math
import warnings
from dataclasses import dataclass
from typing import Callable, NamedTuple, Optional

import torch
from torch import nn

from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, _ExcludedModule, check_adapters_to_merge, check_target_module_exists

from s2ft_format.config import EXPERT_TARGETS
from s2ft_format.tensors import EXPERT_DELTAS, check_delta, check_expert_channels, missing_error

from .layer import S2FTLayer, _stamp
from .selection import seeded_scores

PARTS = tuple(EXPERT_DELTAS)


@dataclass(frozen=True)
class ExpertsLayout:
    """How a fused-experts module stores and routes its experts."""

    num_experts: int
    channels: int  # I, per expert
    hidden: int
    transposed: bool  # gate_up (E, H, 2I) and down (E, I, H)
    interleaved: bool  # gate and up rows alternate (GPT-OSS) instead of [gate; up]
    routed: bool  # forward(hidden, top_k_index, top_k_weights); otherwise pre-routed rows (E*T, H) (Llama 4)

    def rows(self, channels: torch.Tensor, part: str) -> torch.Tensor:
        """gate_up_proj rows holding ``part`` ("gate_proj"/"up_proj") of ``channels`` (E, k)."""
        up = part == "up_proj"
        if self.interleaved:
            return 2 * channels + int(up)
        return channels + self.channels * int(up)

    def gate_up_rows(self, channels: torch.Tensor) -> torch.Tensor:
        """(E, 2k) rows of the channels' gate and up parts, in the order the experts' gate function reads them."""
        return self.pair(self.rows(channels, "gate_proj"), self.rows(channels, "up_proj"), dim=1)

    def pair(self, gate: torch.Tensor, up: torch.Tensor, dim: int = 0) -> torch.Tensor:
        """Gate and up entries of the same channels (along ``dim``) in the order the gate function reads them."""
        if self.interleaved:
            return torch.stack((gate, up), dim=dim + 1).flatten(dim, dim + 1)
        return torch.cat((gate, up), dim=dim)

    def unpair(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inverse of :meth:`pair` along dim 0."""
        if self.interleaved:
            return rows[0::2], rows[1::2]
        return rows.chunk(2)


def base_experts(module: nn.Module) -> nn.Module:
    return module.get_base_layer() if isinstance(module, BaseTunerLayer) else module


def is_experts(module: nn.Module) -> bool:
    """Whether ``module`` (or the module an S2FT layer wraps) holds fused 3-D expert weights."""
    down = getattr(base_experts(module), "down_proj", None)
    return isinstance(down, nn.Parameter) and down.dim() == 3


def experts_layout(module: nn.Module, path: str) -> ExpertsLayout:
    """The layout of a fused-experts module, or a ValueError naming what S2FT cannot adapt in it."""
    module = base_experts(module)
    name = f"'{path}' ({type(module).__name__})"
    gate_up, down = getattr(module, "gate_up_proj", None), module.down_proj
    if not isinstance(gate_up, nn.Parameter) or gate_up.dim() != 3:
        raise ValueError(
            f"S2FT cannot adapt the experts {name}: they have no fused 3-D gate_up_proj (S2FT adapts gated experts)."
        )
    plain = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    if gate_up.dtype not in plain or down.dtype not in plain:
        raise ValueError(
            f"S2FT cannot adapt the experts {name}: their weights are quantized ({gate_up.dtype}, {down.dtype})."
        )
    (experts, a, b), (_, c, d) = gate_up.shape, down.shape
    if down.shape[0] != experts:
        raise ValueError(f"S2FT cannot adapt the experts {name}: gate_up_proj and down_proj hold different experts.")
    # (E, 2I, H) with (E, H, I), or transposed (E, H, 2I) with (E, I, H): the shapes tell which (never both)
    if a == 2 * d and b == c:
        transposed, channels, hidden = False, d, c
    elif b == 2 * c and a == d:
        transposed, channels, hidden = True, c, d
    else:
        raise ValueError(
            f"S2FT cannot adapt the experts {name}: gate_up_proj {tuple(gate_up.shape)} and down_proj "
            f"{tuple(down.shape)} do not share one channel count."
        )
    if getattr(module, "is_transposed", transposed) != transposed:
        raise ValueError(f"S2FT cannot adapt the experts {name}: their weight shapes contradict `is_transposed`.")
    routed = hasattr(module, "has_gate")  # set by transformers' @use_experts_implementation
    if routed and not hasattr(module, "_apply_gate"):
        raise ValueError(f"S2FT cannot adapt the experts {name}: they have no gate to apply.")
    if not routed and (
        list(inspect.signature(module.forward).parameters) != ["hidden_states"] or not hasattr(module, "act_fn")
    ):
        raise ValueError(
            f"S2FT cannot adapt the experts {name}: it does not know how they route tokens (supported: transformers' "
            "@use_experts_implementation experts, and pre-routed experts taking one (experts x tokens, hidden) input "
            "such as Llama 4's)."
        )
    interleaved = not getattr(module, "is_concatenated", True)
    return ExpertsLayout(experts, channels, hidden, transposed, interleaved, routed)


def targeted_parts(config, key: str, module: nn.Module) -> tuple[str, ...]:
    """The parts (``PARTS``) of the experts at ``key`` that ``config`` targets, matched like module names
    (``...experts.down_proj``), so suffixes, regexes and ``exclude_modules`` work as for dense projections."""
    if not is_experts(module) or isinstance(check_target_module_exists(config, key), _ExcludedModule):
        return ()
    parts = set()
    for name, covered in EXPERT_TARGETS.items():
        if check_target_module_exists(config, f"{key}.{name}"):
            parts.update(covered)
    return tuple(part for part in PARTS if part in parts)


def select_channels(count: int, scores: torch.Tensor, order: str = "large") -> torch.Tensor:
    """(E, count) sorted channels per expert with the largest (or smallest) ``scores`` (E, I)."""
    signed = scores.float() if order == "large" else -scores.float()
    return torch.sort(torch.topk(signed, count, dim=1).indices, dim=1).values


def random_channel_scores(layout: ExpertsLayout, path: str, seed: int) -> torch.Tensor:
    """Seeded per expert (``path.e``), so the draw depends neither on visiting order nor on the other experts."""
    return torch.stack([seeded_scores(f"{path}.{e}", layout.channels, seed) for e in range(layout.num_experts)])


def check_experts_target(config, key: str, module: nn.Module) -> None:
    """Refuse experts S2FT cannot adapt under ``config`` before any module changes."""
    layout = experts_layout(module, key)
    config.unit_count("channels", layout.channels)
    if not targeted_parts(config, key, module):  # the experts module itself was named
        raise ValueError(
            f"S2FT adapts parts of the experts '{key}': name them in target_modules ({', '.join(EXPERT_TARGETS)}), "
            "e.g. 'experts.down_proj'."
        )


def add_experts_adapter(config, adapter_name: str, target: nn.Module, key: str) -> Optional["Experts"]:
    """Add ``adapter_name`` to the experts at ``key``: a new :class:`Experts` layer, or None if ``target`` is one.

    Channels are drawn per expert from the seed; score-based strategies replace them at calibration.
    """
    layout = experts_layout(target, key)
    count = config.unit_count("channels", layout.channels)
    channels = select_channels(count, random_channel_scores(layout, key, config.seed), config.selection_order)
    parts = targeted_parts(config, key, target)
    if isinstance(target, Experts):
        target.update_layer(adapter_name, parts, channels, config.init_weights, inference_mode=config.inference_mode)
        return None
    return Experts(target, adapter_name, layout, parts, channels, init_weights=config.init_weights)


class _Routing(NamedTuple):
    rows: torch.Tensor  # (P,) row of the experts' input and output of each routed (row, expert) pair, by expert
    weights: Optional[torch.Tensor]  # (P,) routing weight of each pair; None: already applied to the input rows
    counts: list  # pairs per expert


class _Channels:
    """The frozen weights of the selected channels of every expert, read one expert at a time."""

    def __init__(self, experts: nn.Module, layout: ExpertsLayout, channels: torch.Tensor, gate: Callable):
        self.experts, self.layout, self.gate = experts, layout, gate
        self.channels = channels
        self.rows = layout.gate_up_rows(channels)

    def gate_up(self, expert: int) -> torch.Tensor:
        """(2k, H) gate and up rows of the expert's channels."""
        weight = self.experts.gate_up_proj[expert]
        if self.layout.transposed:
            return weight.index_select(1, self.rows[expert]).t()
        return weight.index_select(0, self.rows[expert])

    def bias(self, expert: int) -> Optional[torch.Tensor]:
        bias = getattr(self.experts, "gate_up_proj_bias", None)
        return None if bias is None else bias[expert].index_select(0, self.rows[expert])

    def down(self, expert: int) -> torch.Tensor:
        """(H, k) down_proj columns of the expert's channels."""
        weight = self.experts.down_proj[expert]
        if self.layout.transposed:
            return weight.index_select(0, self.channels[expert]).t()
        return weight.index_select(1, self.channels[expert])

    def row_delta(self, gate: Optional[torch.Tensor], up: Optional[torch.Tensor], expert: int, dtype) -> torch.Tensor:
        """(2k, H) gate and up deltas of the expert's channels in the gate function's order (zeros for one not
        adapted); built per expert and step, so only the delta parameters themselves are kept for backward."""
        gate, up = (None if delta is None else delta[expert].to(dtype) for delta in (gate, up))
        gate = gate if gate is not None else torch.zeros_like(up)
        return self.layout.pair(gate, up if up is not None else torch.zeros_like(gate))

    def pre_activation(self, x: torch.Tensor, expert: int, out: torch.Tensor) -> torch.Tensor:
        torch.mm(x, self.gate_up(expert).to(x.dtype).t(), out=out)
        bias = self.bias(expert)
        return out if bias is None else out.add_(bias.to(out.dtype))


def _gate_and_vjp(gate: Callable, z: torch.Tensor):
    """``g(z)`` and a function mapping ``dL/dg`` to ``dL/dz`` (any gate the experts define, e.g. GPT-OSS' clamped one)."""
    with torch.enable_grad():
        leaf = z.detach().requires_grad_(True)
        h = gate(leaf)
    return h.detach(), lambda grad: torch.autograd.grad(h, leaf, grad)[0]


class ExpertChannelDelta(torch.autograd.Function):
    """The change of the experts' output from deltas on each expert's channels (see the module docstring).

    ``down_delta`` is (E, H, k) over the channels' down_proj columns, ``gate_delta`` and ``up_delta`` (E, k, H) over
    their gate and up rows; any may be None. Saves the channels' pre-activations (P x 2k, twice when gate/up rows are
    adapted) and, only for the gate/up rows' gradient, the input.
    """

    @staticmethod
    def forward(ctx, x, weights, down_delta, gate_delta, up_delta, frozen: _Channels, rows, counts):
        rows_adapted = gate_delta is not None or up_delta is not None
        pairs, width = rows.numel(), frozen.rows.shape[1]
        out = torch.zeros_like(x)
        z_all = x.new_empty(pairs, width)
        z2_all = x.new_empty(pairs, width) if rows_adapted else None
        start = 0
        for expert, count in enumerate(counts):
            if not count:
                continue
            span = slice(start, start + count)
            start += count
            xe = x.index_select(0, rows[span])
            z = frozen.pre_activation(xe, expert, z_all[span])
            h = frozen.gate(z)
            correction = None
            if rows_adapted:
                z2 = torch.addmm(z, xe, frozen.row_delta(gate_delta, up_delta, expert, x.dtype).t(), out=z2_all[span])
                h2 = frozen.gate(z2)
                correction = (h2 - h) @ frozen.down(expert).to(x.dtype).t()
                h = h2
            if down_delta is not None:
                update = h @ down_delta[expert].to(x.dtype).t()
                correction = update if correction is None else correction.add_(update)
            if weights is not None:
                correction = correction * weights[span, None].to(x.dtype)
            out.index_add_(0, rows[span], correction)
        ctx.frozen, ctx.counts = frozen, counts
        keep_x = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        ctx.save_for_backward(
            x if keep_x else None, weights, down_delta, gate_delta, up_delta, rows, z_all, z2_all
        )
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, weights, down_delta, gate_delta, up_delta, rows, z_all, z2_all = ctx.saved_tensors
        frozen, dtype = ctx.frozen, grad_out.dtype
        need_x, need_w, need_down, need_gate, need_up = ctx.needs_input_grad[:5]
        grad_x = torch.zeros_like(grad_out) if need_x else None
        grad_w = torch.zeros_like(weights) if need_w else None
        grad_down, grad_gate, grad_up = (
            torch.zeros_like(delta) if need else None
            for delta, need in ((down_delta, need_down), (gate_delta, need_gate), (up_delta, need_up))
        )
        start = 0
        for expert, count in enumerate(ctx.counts):
            if not count:
                continue
            span = slice(start, start + count)
            start += count
            grad = grad_out.index_select(0, rows[span])
            scale = weights[span, None].to(dtype) if weights is not None else None
            h, h_vjp = _gate_and_vjp(frozen.gate, z_all[span])
            if z2_all is not None:
                h2, h2_vjp = _gate_and_vjp(frozen.gate, z2_all[span])
                down = frozen.down(expert).to(dtype)
                down2 = down + down_delta[expert].to(dtype) if down_delta is not None else down
                along, along2 = grad @ down, grad @ down2  # dL/dh and dL/dh' before the routing weight
                if need_w:
                    grad_w[span] = ((along2 * h2).sum(1) - (along * h).sum(1)).to(grad_w.dtype)
                dz = h_vjp(-along if scale is None else -along * scale)
                dz2 = h2_vjp(along2 if scale is None else along2 * scale)
                if need_gate or need_up:
                    gate_rows, up_rows = frozen.layout.unpair(dz2.t() @ x.index_select(0, rows[span]))
                    if need_gate:
                        grad_gate[expert] = gate_rows.to(grad_gate.dtype)
                    if need_up:
                        grad_up[expert] = up_rows.to(grad_up.dtype)
                if need_x:
                    dx = (dz + dz2) @ frozen.gate_up(expert).to(dtype)
                    dx.addmm_(dz2, frozen.row_delta(gate_delta, up_delta, expert, dtype))
            else:
                h2 = h
                along = grad @ down_delta[expert].to(dtype)
                if need_w:
                    grad_w[span] = (along * h).sum(1).to(grad_w.dtype)
                if need_x:
                    dx = h_vjp(along if scale is None else along * scale) @ frozen.gate_up(expert).to(dtype)
            if need_down:
                weighted = grad if scale is None else grad * scale
                grad_down[expert] = (weighted.t() @ h2).to(grad_down.dtype)
            if need_x:
                grad_x.index_add_(0, rows[span], dx)
        return grad_x, grad_w, grad_down, grad_gate, grad_up, None, None, None


class ChannelStatistics:
    """Calibration scores of every channel of every expert of one :class:`Experts` layer, (E, I).

    The scores mirror the dense strategies on each expert's down_proj: ``weight`` sums |W_down| over a column,
    ``activation`` sums |h| of the channel over the tokens routed to the expert, ``weight_activation`` multiplies the
    two (|W| by ||h||, Wanda-style) and ``gradient`` sums |dL/dW_down| over a column, per calibration batch.
    """

    def __init__(self, layer: "Experts", selection: str):
        self.layer, self.selection = layer, selection
        self.sums = torch.zeros(layer.layout.num_experts, layer.layout.channels, dtype=torch.float64)
        self.mask: Optional[torch.Tensor] = None  # the batch's tokens (False: padding, which does not score)

    def _activations(self, x: torch.Tensor, routing: _Routing):
        """(expert, its rows of ``x``, their routing weights, h (rows, I)) for every expert that received tokens that
        are not padding."""
        layout = self.layer.layout
        every = torch.arange(layout.channels, device=x.device).expand(layout.num_experts, -1)
        frozen = _Channels(self.layer.get_base_layer(), layout, every, self.layer._gate())
        start = 0
        for expert, count in enumerate(routing.counts):
            span = slice(start, start + count)
            start += count
            rows = routing.rows[span]
            weights = None if routing.weights is None else routing.weights[span]
            if self.mask is not None and x.shape[0] % self.mask.numel() == 0:
                # routed experts see each token once, pre-routed ones (Llama 4) once per expert
                keep = self.mask.to(x.device)[rows % self.mask.numel()]
                rows, weights = rows[keep], (None if weights is None else weights[keep])
            if rows.numel():
                xe = x.index_select(0, rows)
                z = frozen.pre_activation(xe, expert, xe.new_empty(rows.numel(), 2 * layout.channels))
                yield expert, rows, weights, frozen.gate(z).float()

    @torch.no_grad()
    def hook(self, module, args, kwargs, output) -> None:
        x = args[0].detach()
        routing = module._routing(x, args[1:], kwargs)
        x = x.reshape(-1, module.layout.hidden)
        if self.selection == "gradient":
            if output.requires_grad:
                output.register_hook(lambda grad: self._add_gradient(grad, x, routing))
            return
        for expert, _, _, h in self._activations(x, routing):
            total = h.abs().sum(0) if self.selection == "activation" else h.square().sum(0)
            self.sums[expert] += total.double().cpu()

    @torch.no_grad()
    def _add_gradient(self, grad: torch.Tensor, x: torch.Tensor, routing: _Routing) -> None:
        grad = grad.reshape(-1, grad.shape[-1]).float()
        for expert, rows, weights, h in self._activations(x, routing):
            upstream = grad.index_select(0, rows)
            if weights is not None:
                upstream = upstream * weights[:, None].detach().float()
            self.sums[expert] += (upstream.t() @ h).abs().sum(0).double().cpu()

    def scores(self) -> torch.Tensor:
        if self.selection == "activation" or self.selection == "gradient":
            return self.sums.float()
        down = self.layer.get_base_layer().down_proj.detach().float().abs()
        weight = down.sum(2) if self.layer.layout.transposed else down.sum(1)  # per channel: over the hidden size
        return weight.cpu() if self.selection == "weight" else weight.cpu() * self.sums.sqrt().float()


class Experts(nn.Module, S2FTLayer):
    """S²FT on a fused-experts module: per-expert channel deltas on down_proj columns and/or gate/up rows.

    ``s2ft_indices`` holds each expert's channels, (E, k) in the original coordinates; ``s2ft_down_delta`` (E, H, k),
    ``s2ft_gate_delta`` and ``s2ft_up_delta`` (E, k, H) the deltas of the targeted parts. It is an S2FT layer for
    PEFT (activation, deletion, saving) but belongs to no attention/FFN block: it keeps no positions, experts are
    never co-permuted.
    """

    adapter_layer_names = tuple(EXPERT_DELTAS.values())
    other_param_names = ("s2ft_indices",)

    def __init__(self, base_layer: nn.Module, adapter_name: str, layout: ExpertsLayout, parts: tuple,
                 channels: torch.Tensor, init_weights: bool = True, **kwargs) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layout = layout
        self.s2ft_down_delta = nn.ParameterDict({})
        self.s2ft_gate_delta = nn.ParameterDict({})
        self.s2ft_up_delta = nn.ParameterDict({})
        self.s2ft_indices = BufferDict({}, persistent=True)
        self._indices_seen: dict[str, tuple] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        self._merged: dict[str, list] = {}  # adapter -> what merging it added (_merged_deltas), for an exact unmerge
        self._active_adapter = adapter_name
        self._signature = inspect.signature(base_layer.forward)
        self.kwargs = kwargs
        self.update_layer(adapter_name, parts, channels, init_weights)

    # ------------------------------------------------------------------ adapters
    def update_layer(self, adapter_name: str, parts: tuple, channels: torch.Tensor, init_weights: bool,
                     inference_mode: bool = False) -> None:
        self.check_indices(adapter_name, channels)
        experts, count = channels.shape
        hidden = self.layout.hidden
        for part in parts:
            shape = (experts, hidden, count) if part == "down_proj" else (experts, count, hidden)
            delta = torch.zeros(shape) if init_weights else torch.randn(shape) / math.sqrt(shape[2])
            getattr(self, EXPERT_DELTAS[part])[adapter_name] = nn.Parameter(delta)
        self.s2ft_indices[adapter_name] = channels.long()
        self._indices_seen[adapter_name] = _stamp(self.s2ft_indices[adapter_name])
        self._move_adapter_to_device_of_base_layer(adapter_name)
        self.set_adapter(self.active_adapters, inference_mode=inference_mode)

    def parts(self, adapter_name: str) -> tuple[str, ...]:
        return tuple(part for part in PARTS if adapter_name in getattr(self, EXPERT_DELTAS[part]))

    def _get_base_layer_device_and_dtype(self, base_layer):
        return base_layer.down_proj.device, base_layer.down_proj.dtype

    def check_indices(self, adapter_name: str, indices: torch.Tensor, expected_count: Optional[int] = None) -> None:
        """Raise a ValueError naming the problem if ``indices`` cannot name ``expected_count`` channels per expert."""
        experts, channels = self.layout.num_experts, self.layout.channels
        where = f"S2FT adapter '{adapter_name}' (channels of {experts} experts with {channels} channels each)"
        check_expert_channels(where, indices, experts, channels, expected_count)

    def check_saved(self, adapter_name: str, state_dict: dict, path: str, where: str) -> set[str]:
        """Check this layer's tensors of a loaded adapter before anything is loaded; return their keys."""
        indices_key = f"{path}.s2ft_indices.{adapter_name}"
        keys = {part: f"{path}.{EXPERT_DELTAS[part]}.{adapter_name}" for part in self.parts(adapter_name)}
        for what, key in [("indices", indices_key), *((f"{part} delta", key) for part, key in keys.items())]:
            if key not in state_dict:
                raise missing_error(where, what)  # the checks vLLM makes (s2ft_format), in this order
        try:
            self.check_indices(adapter_name, state_dict[indices_key], expected_count=self._count(adapter_name))
        except ValueError as error:
            raise ValueError(f"{error} ({where})") from None
        for part, key in keys.items():
            check_delta(where, state_dict[key], getattr(self, EXPERT_DELTAS[part])[adapter_name].shape, f"{part} delta")
        return {indices_key, *keys.values()}

    def _sync_indices(self) -> None:
        """Check index buffers that a loader wrote directly (without load_state_dict hooks) before they are used."""
        for name, indices in self.s2ft_indices.items():
            if self._indices_seen.get(name) != _stamp(indices):
                self.check_indices(name, indices, expected_count=self._count(name))
                self._indices_seen[name] = _stamp(indices)

    def _count(self, adapter_name: str) -> int:
        """k: the channels per expert the adapter's deltas cover."""
        part = self.parts(adapter_name)[0]
        delta = getattr(self, EXPERT_DELTAS[part])[adapter_name]
        return delta.shape[2] if part == "down_proj" else delta.shape[1]

    # ------------------------------------------------------------------ merging
    def _parameter_view(self, channels: torch.Tensor, delta: torch.Tensor, part: str):
        """(base parameter, dim, scatter index, delta) placing ``part``'s delta over ``channels`` into the base weight."""
        experts = self.get_base_layer()
        if part == "down_proj":
            weight, lines = experts.down_proj, channels
            columns = not self.layout.transposed  # (E, H, I): channels are columns; (E, I, H): rows
        else:
            weight, lines = experts.gate_up_proj, self.layout.rows(channels, part)
            columns = self.layout.transposed  # (E, H, 2I): rows are columns
            delta = delta.transpose(1, 2)  # (E, H, k)
        if columns:
            return weight, 2, lines[:, None, :].expand(-1, weight.shape[1], -1), delta
        return weight, 1, lines[:, :, None].expand(-1, -1, weight.shape[2]), delta.transpose(1, 2)

    def _merged_deltas(self, adapter_name: str) -> list[tuple]:
        """What merging the adapter adds (its parts' views over copies of its channels and deltas), kept until it is
        unmerged, so that unmerging subtracts exactly that even if the adapter is written meanwhile (a loader)."""
        channels = self.s2ft_indices[adapter_name].clone()
        return [self._parameter_view(channels, getattr(self, EXPERT_DELTAS[part])[adapter_name].detach().clone(), part)
                for part in self.parts(adapter_name)]

    @staticmethod
    def _add_deltas(merged_deltas: list[tuple], sign: float, target: Optional[dict] = None) -> None:
        for weight, dim, index, delta in merged_deltas:
            data = weight.data if target is None else target[id(weight)]
            data.scatter_add_(dim, index.to(data.device), (sign * delta).to(data.device, data.dtype))

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        self._sync_indices()
        adapter_names = [name for name in check_adapters_to_merge(self, adapter_names) if name in self.s2ft_indices]
        experts = self.get_base_layer()
        for name in adapter_names:
            merged_deltas = self._merged_deltas(name)
            if safe_merge:
                merged = {id(p): p.data.clone() for p in (experts.gate_up_proj, experts.down_proj)}
                self._add_deltas(merged_deltas, 1.0, merged)
                if not all(torch.isfinite(value).all() for value in merged.values()):
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {name} seems to be broken")
                experts.gate_up_proj.data.copy_(merged[id(experts.gate_up_proj)])
                experts.down_proj.data.copy_(merged[id(experts.down_proj)])
            else:
                self._add_deltas(merged_deltas, 1.0)
            self._merged[name] = merged_deltas
            self.merged_adapters.append(name)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.")
            return
        while self.merged_adapters:
            merged_deltas = self._merged.pop(self.merged_adapters.pop(), None)
            if merged_deltas is not None:
                self._add_deltas(merged_deltas, -1.0)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        adapter_names = kwargs.pop("adapter_names", None)
        self._sync_indices()
        if adapter_names is not None:  # mixed_batch refused every adapter of these experts: all rows get the base
            if self.merged:
                raise ValueError(
                    "Cannot pass `adapter_names` when there are merged adapters, please call `unmerge_adapter` first."
                )
            return self.base_layer(x, *args, **kwargs)
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        result = self.base_layer(x, *args, **kwargs)
        active = [name for name in self.active_adapters if name in self.s2ft_indices]
        if self.merged or not active:
            return result
        if len(active) > 1 and any(part != "down_proj" for name in active for part in self.parts(name)):
            raise ValueError(
                f"S2FT adapters {active} are active together on experts whose gate/up rows one of them adapts: their "
                "changes do not add up through the gate activation. Activate one adapter, or merge them."
            )
        routing = self._routing(x, args, kwargs)
        x2d = x.reshape(-1, self.layout.hidden)
        for name in active:
            frozen = _Channels(self.get_base_layer(), self.layout, self.s2ft_indices[name], self._gate())
            down, gate, up = (getattr(self, EXPERT_DELTAS[part]).get(name) for part in PARTS)
            correction = ExpertChannelDelta.apply(
                x2d, routing.weights, down, gate, up, frozen, routing.rows, routing.counts
            )
            result = result + correction.view_as(result).to(result.dtype)
        return result

    def _gate(self) -> Callable:
        experts = self.get_base_layer()
        if self.layout.routed:
            return experts._apply_gate
        return lambda z: experts.act_fn(z[..., : z.shape[-1] // 2]) * z[..., z.shape[-1] // 2:]

    def _routing(self, x: torch.Tensor, args, kwargs) -> _Routing:
        experts = self.layout.num_experts
        if not self.layout.routed:  # rows (E*T, H): expert e takes rows e*T .. (e+1)*T - 1, weights already applied
            rows = x.reshape(-1, self.layout.hidden).shape[0]
            return _Routing(torch.arange(rows, device=x.device), None, [rows // experts] * experts)
        _, index, weights = list(self._signature.bind(x, *args, **kwargs).arguments.values())[:3]
        slots = index.shape[-1]
        expert_ids = index.reshape(-1)
        tokens = torch.arange(expert_ids.numel() // slots, device=x.device).repeat_interleave(slots)
        valid = (expert_ids >= 0) & (expert_ids < experts)  # expert-parallel sentinels are not local experts
        order = torch.argsort(torch.where(valid, expert_ids, experts), stable=True)[: int(valid.sum())]
        counts = torch.bincount(expert_ids[order], minlength=experts).tolist()
        return _Routing(tokens[order], weights.reshape(-1)[order], counts)

    def __repr__(self) -> str:
        return "s2ft." + super().__repr__()
