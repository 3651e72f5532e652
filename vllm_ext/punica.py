"""CPU punica wrapper: base-model tokens get no LoRA, and each batch's tokens are grouped by slot once for S²FT.

vLLM 0.32's torch punica ops index the stacked LoRA weights with each token's slot, and a base-model token's slot is
-1, which Python indexing turns into the last slot: in a batch that fills every slot, base requests get the last
slot's adapter. Zeroing those tokens' rows after the shrink makes their LoRA contribution exactly zero.

``s2ft_groups`` (:class:`vllm_ext.sparse.TokenGroups`) is what the grouped S²FT formulation of every layer reads; its
``active`` slots come from the host-side mapping, so layers skip the slots' kinds (LoRA, S²FT) the batch does not use
without synchronising anything.
"""

from __future__ import annotations

import torch

from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from .sparse import group_tokens


class S2FTPunicaWrapperCPU(PunicaWrapperCPU):
    def update_metadata(self, mapping, lora_index_to_id, max_loras, vocab_size, **kwargs):
        super().update_metadata(mapping, lora_index_to_id, max_loras, vocab_size, **kwargs)
        ids = set(mapping.index_mapping)
        active = frozenset(slot for slot, lora_id in enumerate(lora_index_to_id) if lora_id in ids)
        self.s2ft_groups = group_tokens(self.token_lora_indices, len(lora_index_to_id), active)

    def _shrink_prefill(self, y: torch.Tensor, x: torch.Tensor, w_t_all: torch.Tensor, scale: float):
        super()._shrink_prefill(y, x, w_t_all, scale)
        self._zero_base_rows(y)

    def _shrink_decode(self, y: torch.Tensor, x: torch.Tensor, w_t_all: torch.Tensor, scale: float):
        super()._shrink_decode(y, x, w_t_all, scale)
        self._zero_base_rows(y)

    def _zero_base_rows(self, y: torch.Tensor) -> None:
        y.masked_fill_((self.token_lora_indices < 0).unsqueeze(1), 0)
