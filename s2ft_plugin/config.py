from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

from peft.config import PeftConfig

from s2ft_format.config import DEFAULTS, SELECTION_STRATEGIES, check_config_values, pattern_units, unit_count

from ._peft_type import ensure_peft_type


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

    # defaults from s2ft_format.DEFAULTS: what a config file that omits a field means, to vLLM and the converter too
    target_modules: Optional[Union[list[str], str]] = field(
        default=DEFAULTS["target_modules"],
        metadata={"help": "Projections to adapt; defaults to o_proj and down_proj for Llama-family models."},
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=DEFAULTS["exclude_modules"], metadata={"help": "Module names or a regex of modules to leave alone."}
    )
    layers_to_transform: Optional[Union[list[int], int]] = field(
        default=DEFAULTS["layers_to_transform"], metadata={"help": "Indices of the layers to adapt (all if None)."}
    )
    layers_pattern: Optional[Union[list[str], str]] = field(
        default=DEFAULTS["layers_pattern"],
        metadata={"help": "Name of the layer list that layers_to_transform indexes, e.g. 'layers'."},
    )
    head_ratio: float = field(
        default=DEFAULTS["head_ratio"], metadata={"help": "Fraction of attention heads selected per block."}
    )
    num_heads: Optional[int] = field(
        default=DEFAULTS["num_heads"], metadata={"help": "Heads per block; overrides head_ratio."}
    )
    channel_ratio: float = field(
        default=DEFAULTS["channel_ratio"], metadata={"help": "Fraction of FFN channels selected per block."}
    )
    num_channels: Optional[int] = field(
        default=DEFAULTS["num_channels"], metadata={"help": "Channels per block; overrides channel_ratio."}
    )
    selection: Literal["random", "weight", "activation", "weight_activation", "gradient"] = field(
        default=DEFAULTS["selection"], metadata={"help": f"Unit scoring strategy, one of {SELECTION_STRATEGIES}."}
    )
    selection_order: Literal["large", "small"] = field(
        default=DEFAULTS["selection_order"], metadata={"help": "Keep the largest or the smallest scores."}
    )
    seed: int = field(default=DEFAULTS["seed"], metadata={"help": "Seed of the random selection."})
    permute: Optional[bool] = field(
        default=DEFAULTS["permute"],
        metadata={"help": "Co-permute coupled weights so the selection is contiguous (None: wherever a block "
                          "allows it)."},
    )
    init_weights: bool = field(
        default=DEFAULTS["init_weights"], metadata={"help": "Start deltas at zero (False: random, for tests)."}
    )
    unit_pattern: Optional[dict[str, int]] = field(
        default=DEFAULTS["unit_pattern"],
        metadata={"help": "Units per module (name or regex -> count), overriding the counts above."},
    )
    modules_to_save: Optional[list[str]] = field(
        default=DEFAULTS["modules_to_save"], metadata={"help": "Modules apart from S2FT layers to train and save."}
    )

    def __post_init__(self):
        check_config_values({name: getattr(self, name) for name in DEFAULTS})  # vLLM and the converter apply them too
        super().__post_init__()
        self.peft_type = ensure_peft_type("S2FT")
        if isinstance(self.target_modules, list):
            self.target_modules = set(self.target_modules)
        if isinstance(self.exclude_modules, list):
            self.exclude_modules = set(self.exclude_modules)

    def unit_count(self, kind: str, total: int) -> int:
        """Selected units of one block: ``kind`` is ``"heads"`` or ``"channels"``, ``total`` the block's units."""
        return unit_count(vars(self), kind, total)

    def pattern_units(self, module_key: str) -> Optional[int]:
        """Units ``unit_pattern`` gives the module at ``module_key`` (None: the block's count applies)."""
        return pattern_units(self.unit_pattern, module_key)
