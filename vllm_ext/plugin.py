"""The ``vllm.general_plugins`` entry point: S²FT folders load wherever vLLM loads LoRA adapters.

vLLM runs general plugins in every process it starts (front end, engine core, workers) before it builds models, and
may run them more than once per process, so :func:`register` is idempotent. It changes four things:

- ``WorkerLoRAManager._load_adapter`` recognises S²FT folders (``peft_type: S2FT``) and builds the LoRAModel itself;
  other folders go to vLLM's loader unchanged. A malformed folder raises there, which fails ``add_lora`` and
  ``/v1/load_lora_adapter`` cleanly.
- ``InputProcessor._validate_lora`` checks an S²FT folder named by a request against the model config before the
  request is queued: a worker that fails to load an adapter in the middle of a batch takes the engine down with it.
- On CPU, where vLLM runs LoRA models eagerly, the linear LoRA layers that S²FT can target are replaced by subclasses
  that apply S²FT slots by gathering (``vllm_ext.layers``). Elsewhere (CUDA graphs cannot capture the per-slot loop)
  S²FT adapters load as exact one-hot LoRA factors and run on vLLM's own kernels.
- On CPU, the punica wrapper gives base-model tokens in a LoRA batch no adapter (``vllm_ext.punica``).
"""

from __future__ import annotations

import functools
import os

_REGISTERED = False


def register() -> None:
    global _REGISTERED
    if _REGISTERED:
        return
    _REGISTERED = True
    _patch_loader()
    _patch_request_validation()
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        _install_gather_layers()
        type(current_platform).get_punica_wrapper = classmethod(
            lambda cls: "vllm_ext.punica.BaseSafePunicaWrapperCPU"
        )


def _patch_loader() -> None:
    from vllm.lora.utils import get_adapter_absolute_path
    from vllm.lora.worker_manager import WorkerLoRAManager

    from .adapter import is_s2ft_folder

    original = WorkerLoRAManager._load_adapter

    @functools.wraps(original)
    def _load_adapter(self, lora_request):
        path = get_adapter_absolute_path(lora_request.lora_path)
        if not is_s2ft_folder(path):
            return original(self, lora_request)
        from .loader import load_s2ft_lora_model

        return load_s2ft_lora_model(self, path, lora_request.lora_int_id)

    WorkerLoRAManager._load_adapter = _load_adapter


def _patch_request_validation() -> None:
    from vllm.v1.engine.input_processor import InputProcessor

    from .adapter import CONFIG_NAME, WEIGHTS_NAME, is_s2ft_folder, read_s2ft_adapter
    from .convert import check_against_config

    original = InputProcessor._validate_lora

    @functools.wraps(original)
    def _validate_lora(self, lora_request):
        original(self, lora_request)
        if lora_request is None or not is_s2ft_folder(lora_request.lora_path):
            return
        # per request, but a folder is read again only when its files change (failures are not remembered)
        path = lora_request.lora_path
        key = (path, *(os.stat(os.path.join(path, name)).st_mtime_ns for name in (CONFIG_NAME, WEIGHTS_NAME)
                       if os.path.exists(os.path.join(path, name))))
        checked = self.__dict__.setdefault("_s2ft_checked", set())
        if key not in checked:
            check_against_config(read_s2ft_adapter(path), self.model_config.hf_config, self.lora_config.max_lora_rank)
            checked.add(key)

    InputProcessor._validate_lora = _validate_lora


def _install_gather_layers() -> None:
    import vllm.lora.utils as lora_utils

    from .layers import GATHER_LAYERS

    replacement = {cls.__bases__[1]: cls for cls in GATHER_LAYERS}  # class S2FTX(S2FTLayerMixin, X)
    lora_utils._all_lora_classes = tuple(replacement.get(cls, cls) for cls in lora_utils._all_lora_classes)
