"""What the vLLM benchmarks share: the served model and its adapters (S2FT and LoRA of equal parameter count), engines,
and the byte counts and bandwidth the benchmarks report.

The model's shape depends on vLLM's platform: on CPU a 4-layer Llama of hidden size 1024 in fp32 (a decode step of the
benchmark's batch takes tens of milliseconds), on CUDA a 4-layer one with Llama-7B's layer shapes in bf16. Either way
one S2FT adapter (2 of 16 or 4 of 32 heads in o_proj, about 5% of the FFN channels in down_proj) holds about 2% of the
base model's matrix weights, the share a default S2FT adapter has in a 7-8B model; on CUDA its k (550 channels)
exceeds 512, the largest LoRA rank vLLM allows.
"""

from __future__ import annotations

import gc
import os
import statistics
import time

import torch

SHAPES = {
    "cpu": dict(hidden=1024, intermediate=2816, heads=16, layers=4, s2ft_heads=2, s2ft_channels=128, dtype="float32"),
    "cuda": dict(hidden=4096, intermediate=11008, heads=32, layers=4, s2ft_heads=4, s2ft_channels=550,
                 dtype="bfloat16"),
}
TARGETS = ["o_proj", "down_proj"]  # S2FT's defaults; LoRA gets the same projections


def platform() -> str:
    """``"cpu"`` or ``"cuda"``: the vLLM build installed decides where the engines run."""
    from vllm.platforms import current_platform

    if current_platform.is_cuda():
        return "cuda"
    if current_platform.is_cpu():
        return "cpu"
    raise SystemExit(f"These benchmarks run on vLLM's CPU and CUDA platforms, not {current_platform.device_name!r}.")


def add_model_args(parser) -> None:
    """Model and adapter shape options; unset ones take the platform's defaults (``SHAPES``, see :func:`parse`), or
    with ``--model`` the model's own shapes and S2FT's default ratios."""
    parser.add_argument("--model", help="a transformers folder for real shapes, e.g. models/SmolLM2-135M-Instruct "
                                        "(make real-model); default: a synthetic Llama")
    for name, kind in (("hidden", int), ("intermediate", int), ("heads", int), ("layers", int), ("dtype", str)):
        parser.add_argument(f"--{name}", type=kind)
    parser.add_argument("--s2ft-heads", type=int, help="heads per block (o_proj columns = heads x head_dim)")
    parser.add_argument("--s2ft-channels", type=int, help="FFN channels per block (down_proj columns)")


def parse(parser):
    args = parser.parse_args()
    args.platform = platform()
    if args.model:
        for name, value in model_shapes(args.model).items():
            setattr(args, name, value if getattr(args, name) is None else getattr(args, name))
    for name, value in SHAPES[args.platform].items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


def model_shapes(model_dir: str) -> dict:
    """A real model's shapes, and the heads and channels S2FT's default config selects on it."""
    from transformers import AutoConfig

    from s2ft_plugin import S2FTConfig

    config, defaults = AutoConfig.from_pretrained(model_dir), S2FTConfig()
    return dict(hidden=config.hidden_size, intermediate=config.intermediate_size, heads=config.num_attention_heads,
                layers=config.num_hidden_layers, s2ft_heads=defaults.unit_count("heads", config.num_attention_heads),
                s2ft_channels=defaults.unit_count("channels", config.intermediate_size))


def describe(args) -> str:
    from vllm import __version__

    where = torch.cuda.get_device_name() if args.platform == "cuda" else f"{os.cpu_count()}-core CPU"
    model = args.model or "synthetic Llama"
    return (f"vLLM {__version__} ({args.platform}), torch {torch.__version__}, {where}, {args.dtype}; {model}: hidden "
            f"{args.hidden}, intermediate {args.intermediate}, {args.heads} heads, {args.layers} layers")


def save_base(args, root: str) -> str:
    """The served model: ``--model`` as it is, else a synthetic Llama written under ``root``."""
    if args.model:
        return args.model
    from s2ft_plugin.tiny import save_checkpoint

    return save_checkpoint(os.path.join(root, "base"), "llama", hidden_size=args.hidden,
                           intermediate_size=args.intermediate, num_hidden_layers=args.layers,
                           num_attention_heads=args.heads, num_key_value_heads=args.heads)


def save_adapters(base_dir: str, args, root: str, count: int) -> tuple[dict, dict]:
    """``count`` random S2FT adapters (each its own heads and channels) and as many LoRA adapters of the rank whose
    parameter count is closest, on the same projections. Returns ({method: folders}, {method: parameters})."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from common import equal_parameter_rank
    from s2ft_plugin import S2FTConfig

    def s2ft_config(seed):
        return S2FTConfig(task_type="CAUSAL_LM", num_heads=args.s2ft_heads, num_channels=args.s2ft_channels,
                          target_modules=TARGETS, init_weights=False, seed=seed)

    base = AutoModelForCausalLM.from_pretrained(base_dir)
    rank = equal_parameter_rank(base, s2ft_config(0), TARGETS)
    configs = {
        "s2ft": s2ft_config,
        "lora": lambda seed: LoraConfig(task_type="CAUSAL_LM", r=rank, lora_alpha=rank, target_modules=TARGETS,
                                        init_lora_weights=False),
    }
    folders, parameters = {}, {}
    for method, config in configs.items():
        names = [f"{method}{i}" for i in range(count)]
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config(0), adapter_name=names[0])
        for seed, name in enumerate(names[1:], start=1):
            torch.manual_seed(seed)  # LoRA's random init
            model.add_adapter(name, config(seed))
        parameters[method] = sum(p.numel() for n, p in model.named_parameters() if names[0] in n.split("."))
        model.save_pretrained(os.path.join(root, method), selected_adapters=names)  # one folder per adapter
        folders[method] = [os.path.join(root, method, name) for name in names]
        del model
    parameters["lora_rank"] = rank
    return folders, parameters


def start_engine(base_dir: str, args, max_loras: int = 0, max_lora_rank: int = 0, s2ft_max_k: str = "0",
                 **engine_args):
    """A vLLM engine (LoRA enabled when ``max_loras``) whose S2FT buffers hold ``s2ft_max_k`` (a
    ``VLLM_S2FT_MAX_K`` value; "0": none, as a LoRA-only deployment). The setting stays in this process's
    environment, where the front end checks S2FT requests against it: start the S2FT engine last."""
    from vllm import LLM

    from vllm_ext.capacity import SETTING

    os.environ[SETTING] = s2ft_max_k
    lora = dict(enable_lora=True, max_loras=max_loras, max_lora_rank=max_lora_rank) if max_loras else {}
    # up to three engines share one GPU: each may claim a quarter of its memory (the KV cache takes 1 GiB)
    return LLM(model=base_dir, dtype=args.dtype, seed=0, kv_cache_memory_bytes=1 << 30, gpu_memory_utilization=0.25,
               **lora, **engine_args)


def stop_engine(llm) -> None:
    from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

    llm.llm_engine.engine_core.shutdown()
    del llm
    gc.collect()
    cleanup_dist_env_and_memory()


# S2FT slots have buffers of their own, so an engine serving only S2FT needs vLLM's smallest LoRA rank
S2FT_ENGINE_RANK = 1


def s2ft_max_k(adapter_dir: str) -> str:
    """The ``VLLM_S2FT_MAX_K`` value that gives each projection of this adapter exactly its k (the benchmarks'
    adapters all have the same k)."""
    from vllm_ext.adapter import read_s2ft_adapter

    needed = {}
    for path, module in read_s2ft_adapter(adapter_dir).modules.items():
        projection = path.rpartition(".")[2]
        needed[projection] = max(needed.get(projection, 0), module.k)
    return ",".join(f"{projection}={k}" for projection, k in sorted(needed.items()))


def synchronize() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def worker_read_bandwidth(worker, device: str) -> float:
    """:func:`read_bandwidth` in an engine's worker (``LLM.collective_rpc``), whose threads vLLM pins on CPU."""
    return read_bandwidth(device)


def read_bandwidth(device: str, megabytes: int = 512, repeats: int = 7) -> float:
    """Bytes per second this process reads from memory (median of summing a buffer far larger than the caches)."""
    buffer = torch.ones(megabytes << 18, dtype=torch.float32, device=device)
    buffer.sum()
    times = []
    for _ in range(repeats):
        synchronize()
        start = time.perf_counter()
        buffer.sum()
        synchronize()
        times.append(time.perf_counter() - start)
    return buffer.numel() * 4 / statistics.median(times)


def folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, name)) for name in os.listdir(path))


def adapter_read_bytes(adapter_dir: str, dtype: str) -> int:
    """Bytes of one adapter as an engine serving in ``dtype`` holds it: float tensors in ``dtype``, index tensors as
    stored."""
    from safetensors import safe_open

    width = torch.empty(0, dtype=getattr(torch, dtype)).element_size()
    total = 0
    with safe_open(os.path.join(adapter_dir, "adapter_model.safetensors"), "pt") as f:
        for key in f.keys():
            part = f.get_slice(key)
            numel = 1
            for size in part.get_shape():
                numel *= size
            stored = part.get_dtype()
            total += numel * (width if stored.startswith(("F", "BF")) else int(stored.lstrip("IU")) // 8)
    return total


def base_linear_parameters(base_dir: str) -> int:
    """Weights of the base model's matrix multiplications per token (every projection and the LM head)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(base_dir)
    head_dim = config.hidden_size // config.num_attention_heads
    attention = config.hidden_size * head_dim * 2 * (config.num_attention_heads + config.num_key_value_heads)
    ffn = 3 * config.hidden_size * config.intermediate_size
    return config.num_hidden_layers * (attention + ffn) + config.hidden_size * config.vocab_size
