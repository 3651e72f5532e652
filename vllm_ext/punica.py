"""CPU punica wrapper that leaves base-model tokens alone.

vLLM 0.32's torch punica ops index the stacked LoRA weights with each token's slot, and a base-model token's slot is
-1, which Python indexing turns into the last slot: in a batch that fills every slot, base requests get the last
slot's adapter. Zeroing those tokens' rows after the shrink makes their LoRA contribution exactly zero.
"""

from __future__ import annotations

import torch

from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU


class BaseSafePunicaWrapperCPU(PunicaWrapperCPU):
    def _shrink_prefill(self, y: torch.Tensor, x: torch.Tensor, w_t_all: torch.Tensor, scale: float):
        super()._shrink_prefill(y, x, w_t_all, scale)
        self._zero_base_rows(y)

    def _shrink_decode(self, y: torch.Tensor, x: torch.Tensor, w_t_all: torch.Tensor, scale: float):
        super()._shrink_decode(y, x, w_t_all, scale)
        self._zero_base_rows(y)

    def _zero_base_rows(self, y: torch.Tensor) -> None:
        y.masked_fill_((self.token_lora_indices < 0).unsqueeze(1), 0)
