"""The ``vllm.general_plugins`` entry point: S²FT folders load wherever vLLM loads LoRA adapters.

vLLM runs general plugins in every process it starts (front end, engine core, workers) before it builds models, and
may run them more than once per process, so :func:`register` is idempotent. It changes these things:

- ``VLLM_S2FT_MAX_K`` joins ``vllm.envs.environment_variables``, the table vLLM checks ``VLLM_*`` variables against
  when it builds an engine config (after loading plugins): without it every start warned "Unknown vLLM environment
  variable detected" (and refused to start under ``--fail-on-environ-validation``). Being in the table also puts the
  setting into the hash of vLLM's compile cache, as it should: it sizes the S2FT buffers compiled graphs capture.
- ``EngineArgs.from_cli_args``, where a server turns its command line into the engine's arguments, sizes the S²FT
  buffers from the S²FT folders in ``--lora-modules`` unless ``VLLM_S2FT_MAX_K`` is set (``vllm_ext.capacity``):
  the front end alone knows those paths, and the engine config it builds reaches every engine and worker process.
- ``WorkerLoRAManager._load_adapter`` recognises S²FT folders (``peft_type: S2FT``) and builds the LoRAModel itself
  (``vllm_ext.loader``); other folders go to vLLM's loader unchanged. A malformed folder raises there, which fails
  ``add_lora`` cleanly.
- The front end makes the loader's checks (``vllm_ext.validation``) on an S²FT folder before a worker sees it, so an
  unfit adapter is a client error (HTTP 400), never a worker failure: ``InputProcessor._validate_lora`` for a request
  naming the folder (a worker that fails to load an adapter in the middle of a batch takes the engine down with it),
  and ``OpenAIServingModels._check_load_lora_adapter_request`` for ``/v1/load_lora_adapter`` and ``--lora-modules``
  (vLLM answers 500 for any failure of the worker's ``add_lora``).
- vLLM's row-parallel, merged-column and merged-qkv LoRA layers (plain and fully sharded) are replaced by subclasses
  whose slots can also hold S²FT adapters (``vllm_ext.layers``), on every platform.
- On CPU, the punica wrapper gives base-model tokens in a LoRA batch no adapter and groups each batch's tokens by
  slot for the S²FT layers (``vllm_ext.punica``); MoE models keep vLLM's CPU experts kernel with LoRA enabled, with
  S²FT expert adapters added beside it and LoRA adapters on the experts refused (``vllm_ext.moe``).
- ``LoRAConfig.verify_with_model_config`` refuses, where vLLM's Triton LoRA kernels run, dtypes they cannot run
  (``vllm_ext.dtypes``): a float32 model fails when the engine's config is built, naming ``--dtype``.
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
    _register_setting()
    _patch_loader()
    _patch_startup_sizing()
    _patch_request_validation()
    _install_s2ft_layers()
    _patch_lora_dtype_check()
    from vllm.platforms import current_platform

    if current_platform.is_cpu():
        type(current_platform).get_punica_wrapper = classmethod(lambda cls: "vllm_ext.punica.S2FTPunicaWrapperCPU")
        from .moe import install

        install()  # S2FT (and no LoRA) on fused MoE experts


def _register_setting() -> None:
    import vllm.envs as envs

    from .capacity import DEFAULT, SETTING

    envs.environment_variables.setdefault(SETTING, lambda: os.environ.get(SETTING, DEFAULT))


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


def _patch_startup_sizing() -> None:
    from vllm.engine.arg_utils import EngineArgs
    from vllm.lora.utils import get_adapter_absolute_path

    from .capacity import SETTING, SIZED, sized_from_adapters

    original = EngineArgs.__dict__["from_cli_args"].__func__

    @functools.wraps(original)
    def from_cli_args(cls, args):
        engine_args = original(cls, args)
        modules = getattr(args, "lora_modules", None)  # the server's --lora-modules (LoRAModulePath list)
        if engine_args.enable_lora and modules and SETTING not in os.environ:
            sized = sized_from_adapters([get_adapter_absolute_path(module.path) for module in modules])
            if sized is not None and isinstance(engine_args.additional_config, dict):
                engine_args.additional_config = {**engine_args.additional_config, SIZED: sized}
        return engine_args

    EngineArgs.from_cli_args = classmethod(from_cli_args)


def _patch_request_validation() -> None:
    from vllm.entrypoints.openai.models.serving import OpenAIServingModels
    from vllm.entrypoints.serve import create_error_response
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

    class RefusedS2FTAdapter(VLLMValidationError, ValueError):
        """A request names an S²FT adapter the engine would refuse (the server answers 400)."""

    original_validate = InputProcessor._validate_lora

    @functools.wraps(original_validate)
    def _validate_lora(self, lora_request):
        original_validate(self, lora_request)
        if lora_request is not None:
            refusal = _refusal(self, lora_request.lora_path, remember=True)
            if refusal is not None:
                raise RefusedS2FTAdapter(refusal)

    original_check_load = OpenAIServingModels._check_load_lora_adapter_request

    @functools.wraps(original_check_load)
    async def _check_load_lora_adapter_request(self, request):
        error = await original_check_load(self, request)
        if error is not None:
            return error
        refusal = _refusal(self.input_processor, request.lora_path, remember=False)
        return None if refusal is None else create_error_response(refusal)  # 400 BadRequestError

    InputProcessor._validate_lora = _validate_lora
    OpenAIServingModels._check_load_lora_adapter_request = _check_load_lora_adapter_request


def _refusal(input_processor, lora_path: str, remember: bool) -> str | None:
    """Why the engine of ``input_processor`` (a vLLM ``InputProcessor``) would refuse the S²FT folder ``lora_path``;
    None for a servable S²FT folder or any other folder (vLLM judges those).

    With ``remember`` (per request) a folder that passed is read again only when its files change; failures are not
    remembered.
    """
    from vllm.lora.utils import get_adapter_absolute_path

    from .adapter import folder_state, is_s2ft_folder, read_s2ft_adapter
    from .capacity import SIZED, engine_setting
    from .moe import experts_refusal
    from .validation import check_servable

    path = get_adapter_absolute_path(lora_path)  # as the worker resolves it (~, relative paths, hub ids)
    if input_processor.lora_config is None:  # LoRA off: vLLM says so itself
        return None
    refusal = experts_refusal(input_processor, path)  # LoRA on fused MoE experts, which no CPU kernel applies
    if refusal is not None or not is_s2ft_folder(path):
        return refusal
    additional = input_processor.vllm_config.additional_config
    setting = engine_setting(additional.get(SIZED) if isinstance(additional, dict) else None)
    key = (path, setting, folder_state(path))
    checked = input_processor.__dict__.setdefault("_s2ft_checked", set())
    if remember and key in checked:
        return None
    try:
        check_servable(read_s2ft_adapter(path), input_processor.model_config.hf_config,
                       input_processor.lora_config.target_modules, setting)
    except ValueError as error:  # a client error (HTTP 400), not an engine failure (500)
        return str(error)
    checked.add(key)
    return None


def _patch_lora_dtype_check() -> None:
    from vllm.config.lora import LoRAConfig
    from vllm.platforms import current_platform

    from .dtypes import check_lora_dtypes

    original = LoRAConfig.verify_with_model_config

    @functools.wraps(original)
    def verify_with_model_config(self, model_config):
        original(self, model_config)  # resolves lora_dtype ("auto": the model's)
        check_lora_dtypes(current_platform.get_punica_wrapper(), model_config.dtype, self.lora_dtype)

    LoRAConfig.verify_with_model_config = verify_with_model_config


def _install_s2ft_layers() -> None:
    import vllm.lora.utils as lora_utils

    from .layers import S2FT_LAYERS

    lora_utils._all_lora_classes = tuple(S2FT_LAYERS.get(cls, cls) for cls in lora_utils._all_lora_classes)
