from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig
from peft.utils.other import get_pattern_key

from ._peft_type import ensure_peft_type

SELECTION_STRATEGIES = ("random", "weight", "activation", "weight_activation", "gradient")
SELECTION_ORDERS = ("large", "small")


@dataclass
class S2FTConfig(PeftConfig):
    """Configuration of an S²FT (Structured Sparse Fine-Tuning) adapter.

    S²FT trains a few attention heads and FFN channels per transformer block. A head couples rows of q/k/v_proj with
    columns of o_proj; a channel couples rows of gate/up_proj with a column of down_proj. Units are selected once per
    block and every targeted projection of the block trains the rows or columns of those units.

    Per-block counts depend only on this config and the model's shapes, so loading rebuilds identical layers before
    the saved indices (always in the original, unpermuted coordinates) are read.

    Args:
        target_modules: Projections to adapt. Defaults to ``o_proj`` and ``down_proj`` for Llama-family models: their
            adapted side is the input, so partial backprop keeps only the selected activations. On MoE models
            ``down_proj``, ``gate_proj``, ``up_proj`` and ``gate_up_proj`` also name the parts of the fused experts
            (``...experts.down_proj``), where every expert trains its own channels.
        exclude_modules: Module names, or a regex, of modules to leave alone (PEFT's semantics).
        layers_to_transform: Only adapt the layers with these indices (PEFT's semantics, as for LoRA).
        layers_pattern: Name of the module list holding the layers (e.g. ``"layers"``, ``"h"``) that
            ``layers_to_transform`` indexes; needed only where PEFT's default guess does not find it.
        head_ratio: Fraction of attention heads selected per block (``0 < head_ratio <= 1``).
        num_heads: Exact number of heads per block; overrides ``head_ratio``.
        channel_ratio: Fraction of FFN channels selected per block (``0 < channel_ratio <= 1``).
        num_channels: Exact number of FFN channels per block (per expert in MoE blocks); overrides ``channel_ratio``.
        selection: How units are scored: ``random``, ``weight`` (magnitude), ``activation`` (magnitude),
            ``weight_activation`` (their product) or ``gradient``. Score-based strategies need
            ``initialize_s2ft_selection(model, dataloader)`` before training.
        selection_order: ``large`` keeps the highest-scoring units, ``small`` the lowest.
        seed: Seed of the random strategy (also of the placeholder selection of score-based strategies).
        permute: Co-permute the coupled weights so that the selected units are contiguous ("compute densely"). The
            permutation preserves the model's function, never shows in state dicts of the base model, and is undone
            by ``unload``/``merge_and_unload``. ``None`` (default) co-permutes every block whose coupled weights S2FT
            can move together (full precision, unfused, no unknown per-head state) and leaves the others in place;
            ``True`` requires it and refuses a model where it is impossible; ``False`` never permutes. It is an
            optimisation, not part of the adapter: loading ignores what cannot be honoured.
        init_weights: ``True`` starts every delta at zero (the adapter leaves outputs unchanged); ``False`` draws
            small random deltas, which is only useful for tests.
        unit_pattern: Units per module, keyed by module name or regex like LoRA's ``rank_pattern``: query heads
            for q_proj/o_proj, key/value heads for k_proj/v_proj, channels for FFN projections. Overrides the
            counts above for the modules it matches. ``add_weighted_adapter`` writes it: a combined adapter covers
            the union of its sources' units, which differs from module to module.
        modules_to_save: Extra modules to train and save, as in other PEFT methods.
    """

    target_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Projections to adapt; defaults to o_proj and down_proj for Llama-family models."}
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Module names or a regex of modules to leave alone."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=None, metadata={"help": "Indices of the layers to adapt (all if None)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=None, metadata={"help": "Name of the layer list that layers_to_transform indexes, e.g. 'layers'."}
    )
    head_ratio: float = field(default=0.125, metadata={"help": "Fraction of attention heads selected per block."})
    num_heads: Optional[int] = field(default=None, metadata={"help": "Heads per block; overrides head_ratio."})
    channel_ratio: float = field(default=0.05, metadata={"help": "Fraction of FFN channels selected per block."})
    num_channels: Optional[int] = field(default=None, metadata={"help": "Channels per block; overrides channel_ratio."})
    selection: Literal["random", "weight", "activation", "weight_activation", "gradient"] = field(
        default="random", metadata={"help": f"Unit scoring strategy, one of {SELECTION_STRATEGIES}."}
    )
    selection_order: Literal["large", "small"] = field(
        default="large", metadata={"help": "Keep the largest or the smallest scores."}
    )
    seed: int = field(default=42, metadata={"help": "Seed of the random selection."})
    permute: Optional[bool] = field(
        default=None, metadata={"help": "Co-permute coupled weights so the selection is contiguous (None: wherever "
                                        "a block allows it)."}
    )
    init_weights: bool = field(default=True, metadata={"help": "Start deltas at zero (False: random, for tests)."})
    unit_pattern: Optional[dict[str, int]] = field(
        default=None, metadata={"help": "Units per module (name or regex -> count), overriding the counts above."}
    )
    modules_to_save: Optional[list[str]] = field(
        default=None, metadata={"help": "Modules apart from S2FT layers to train and save."}
    )

    def __post_init__(self):
        self._check_types()
        super().__post_init__()
        self.peft_type = ensure_peft_type("S2FT")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)
        for name in ("head_ratio", "channel_ratio"):
            value = getattr(self, name)
            if not 0.0 < value <= 1.0:
                raise ValueError(f"S2FTConfig.{name} must lie in (0, 1], got {value!r}.")
        for name in ("num_heads", "num_channels"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"S2FTConfig.{name} must be a positive int or None, got {value!r}.")
        for key, count in (self.unit_pattern or {}).items():
            if count < 1:
                raise ValueError(f"S2FTConfig.unit_pattern gives {key!r} {count} units; counts must be positive.")
        self._check_layer_selection()
        if self.selection not in SELECTION_STRATEGIES:
            raise ValueError(f"S2FTConfig.selection must be one of {SELECTION_STRATEGIES}, got {self.selection!r}.")
        if self.selection_order not in SELECTION_ORDERS:
            raise ValueError(
                f"S2FTConfig.selection_order must be one of {SELECTION_ORDERS}, got {self.selection_order!r}."
            )

    def _check_layer_selection(self) -> None:
        """The rules LoRA's config applies to ``layers_to_transform``/``layers_pattern``."""
        if isinstance(self.layers_to_transform, int):
            indices = [self.layers_to_transform]
        else:
            indices = self.layers_to_transform or []
        if any(index < 0 for index in indices):
            raise ValueError(f"S2FTConfig.layers_to_transform must hold layer indices >= 0, got {indices}.")
        if isinstance(self.target_modules, str) and (self.layers_to_transform is not None or self.layers_pattern):
            raise ValueError(
                "S2FTConfig.layers_to_transform and layers_pattern cannot be used when target_modules is a regex "
                "string; put the layers into the regex, or give target_modules as a list of names."
            )
        if self.layers_pattern and self.layers_to_transform is None:
            raise ValueError("S2FTConfig.layers_pattern needs layers_to_transform: the indices of the layers to adapt.")

    def _check_types(self) -> None:
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
            value = getattr(self, name)
            if not accepts(value):
                raise TypeError(f"S2FTConfig.{name} must be {kind}, got {value!r} ({type(value).__name__}).")

    def unit_count(self, kind: str, total: int) -> int:
        """Selected units of one block: ``kind`` is ``"heads"`` or ``"channels"``, ``total`` the block's units."""
        exact, ratio = (self.num_heads, self.head_ratio) if kind == "heads" else (self.num_channels, self.channel_ratio)
        count = exact if exact is not None else max(1, round(ratio * total))
        if count > total:
            raise ValueError(f"S2FTConfig asks for {count} {kind} per block but the model has only {total}.")
        return count

    def pattern_units(self, module_key: str) -> Optional[int]:
        """Units ``unit_pattern`` gives the module at ``module_key`` (None: the block's count applies)."""
        if not self.unit_pattern:
            return None
        return self.unit_pattern.get(get_pattern_key(list(self.unit_pattern), module_key))
