"""The ``vllm.general_plugins`` entry point: S²FT folders load wherever vLLM loads LoRA adapters.

vLLM runs general plugins in every process it starts (front end, engine core, workers) before it builds models, and
may run them more than once per process, so :func:`register` is idempotent. It changes four things:

- ``WorkerLoRAManager._load_adapter`` recognises S²FT folders (``peft_type: S2FT``) and builds the LoRAModel itself
  (``vllm_ext.loader``); other folders go to vLLM's loader unchanged. A malformed folder raises there, which fails
  ``add_lora`` and ``/v1/load_lora_adapter`` cleanly.
- ``InputProcessor._validate_lora`` makes the loader's checks (``vllm_ext.validation``) on an S²FT folder named by a
  request before the request is queued: a worker that fails to load an adapter in the middle of a batch takes the
  engine down with it.
- vLLM's row-parallel, merged-column and merged-qkv LoRA layers (plain and fully sharded) are replaced by subclasses
  whose slots can also hold S²FT adapters (``vllm_ext.layers``), on every platform.
- On CPU, the punica wrapper gives base-model tokens in a LoRA batch no adapter and groups each batch's tokens by
  slot for the S²FT layers (``vllm_ext.punica``).
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
    _install_s2ft_layers()
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        type(current_platform).get_punica_wrapper = classmethod(lambda cls: "vllm_ext.punica.S2FTPunicaWrapperCPU")
        from .moe import install

        install()  # S2FT (and no LoRA) on fused MoE experts


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
    from vllm.exceptions import VLLMValidationError
    from vllm.lora.utils import get_adapter_absolute_path
    from vllm.v1.engine.input_processor import InputProcessor

    from .adapter import CONFIG_NAME, WEIGHTS_NAME, is_s2ft_folder, read_s2ft_adapter
    from .capacity import SETTING
    from .validation import check_servable

    class RefusedS2FTAdapter(VLLMValidationError, ValueError):
        """A request names an S²FT adapter the engine would refuse (the server answers 400)."""

    original = InputProcessor._validate_lora

    @functools.wraps(original)
    def _validate_lora(self, lora_request):
        original(self, lora_request)
        if lora_request is None:
            return
        path = get_adapter_absolute_path(lora_request.lora_path)  # as the worker resolves it (~, relative, hub id)
        if not is_s2ft_folder(path):
            return
        # per request, but a folder is read again only when its files change (failures are not remembered)
        key = (path, os.environ.get(SETTING), *(os.stat(os.path.join(path, name)).st_mtime_ns
                                                 for name in (CONFIG_NAME, WEIGHTS_NAME)
                                                 if os.path.exists(os.path.join(path, name))))
        checked = self.__dict__.setdefault("_s2ft_checked", set())
        if key not in checked:
            try:
                check_servable(read_s2ft_adapter(path), self.model_config.hf_config, self.lora_config.target_modules)
            except ValueError as error:  # a client error (HTTP 400), not an engine failure (500)
                raise RefusedS2FTAdapter(str(error)) from None
            checked.add(key)

    InputProcessor._validate_lora = _validate_lora


def _install_s2ft_layers() -> None:
    import vllm.lora.utils as lora_utils

    from .layers import S2FT_LAYERS

    lora_utils._all_lora_classes = tuple(S2FT_LAYERS.get(cls, cls) for cls in lora_utils._all_lora_classes)
