"""Exact S²FT -> LoRA conversion: an export for LoRA servers without this plugin (serving never uses it).

An S²FT delta is a rank-k LoRA whose one factor is a one-hot selector: ``x[:, S] D^T = (x E^T) D^T`` with
``E[j, S_j] = 1`` (input side), and ``y[:, S] += x D^T`` is ``y += (x D^T) E`` (output side). With ``lora_alpha = r``
the LoRA scaling is 1, so the converted adapter is exact; k is zero-padded to one of vLLM's allowed ranks.

    python -m vllm_ext.convert SRC DST [--base-model DIR]

The adapter is checked against the base model's config as PEFT's loader checks it (``vllm_ext.validation``): an
adapter PEFT refuses (from a deeper model, incomplete, a config it cannot apply) is refused, not converted into a LoRA
adapter PEFT would load without a word. DST must not be SRC (however it is spelled). The LoRA folder is written into a
staging folder beside DST first: a new DST appears whole or not at all; an existing DST gets each file replaced by an
atomic rename.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import uuid

import torch
from safetensors.torch import save_file

from .adapter import CONFIG_NAME, PREFIX, WEIGHTS_NAME, MalformedS2FTAdapter, S2FTModule, read_s2ft_adapter
from .validation import Projection, check_fits_model

# the values vLLM accepts for --max-lora-rank (vllm.config.lora.MaxLoRARanks, vLLM 0.32)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_rank(k: int, max_rank: int = VLLM_LORA_RANKS[-1]) -> int:
    """The smallest allowed vLLM LoRA rank that holds ``k`` selected rows/columns; refuse k above ``max_rank``."""
    if k > VLLM_LORA_RANKS[-1]:
        raise ValueError(
            f"The S2FT adapter selects {k} rows/columns in one projection, above vLLM's largest LoRA rank "
            f"{VLLM_LORA_RANKS[-1]}; serve it merged (PeftModel.merge_and_unload) instead."
        )
    rank = next(r for r in VLLM_LORA_RANKS if r >= k)
    if rank > max_rank:
        raise ValueError(
            f"The S2FT adapter selects {k} rows/columns in one projection but the engine runs with "
            f"max_lora_rank={max_rank}; start it with --max-lora-rank {rank} (or more)."
        )
    return rank


def lora_factors(module: S2FTModule, projection: Projection, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(lora_A (rank, in), lora_B (out, rank))`` with ``lora_B @ lora_A`` equal to the module's dense delta."""
    k = module.k
    selector = torch.zeros(rank, projection.axis_size, dtype=module.delta.dtype)
    selector[torch.arange(k), module.indices.long()] = 1
    if projection.side == "input":  # delta (out, k): B = [D | 0], A = E
        lora_b = torch.zeros(module.delta.shape[0], rank, dtype=module.delta.dtype)
        lora_b[:, :k] = module.delta
        return selector, lora_b
    lora_a = torch.zeros(rank, module.delta.shape[1], dtype=module.delta.dtype)  # delta (k, in): A = [D; 0], B = E^T
    lora_a[:k] = module.delta
    return lora_a, selector.t().contiguous()


def convert_s2ft_to_lora(src: str, dst: str, base_model: str | None = None) -> str:
    """Write the S²FT adapter in ``src`` as a standard PEFT LoRA folder ``dst`` and return ``dst``.

    ``base_model`` (a folder or hub id with a config) gives the projection sizes the one-hot factors span; it
    defaults to the adapter's ``base_model_name_or_path``.
    """
    from peft import LoraConfig
    from transformers import AutoConfig

    _check_output(src, dst)
    adapter = read_s2ft_adapter(src)
    if adapter.experts:
        raise MalformedS2FTAdapter(
            f"S2FT adapter at {src!r}, module {next(iter(adapter.experts))!r}: the converter exports dense "
            "projections only, not deltas on fused MoE experts; serve the S2FT folder (vLLM on CPU, vllm_ext.moe) or "
            "the merged model instead."
        )
    base_model = base_model or adapter.config.get("base_model_name_or_path")
    if not base_model:
        raise ValueError(f"{src!r} names no base model; pass base_model (--base-model) to size the one-hot factors.")
    # the checks PEFT's loader makes: a LoRA adapter has no indices for PEFT to check against the model later
    projections = check_fits_model(adapter, AutoConfig.from_pretrained(base_model))
    rank = lora_rank(adapter.max_k)
    tensors = {}
    for path, module in adapter.modules.items():
        lora_a, lora_b = lora_factors(module, projections[path], rank)
        tensors[f"{PREFIX}{path}.lora_A.weight"] = lora_a.contiguous()
        tensors[f"{PREFIX}{path}.lora_B.weight"] = lora_b.contiguous()
    config = LoraConfig(
        r=rank,
        lora_alpha=rank,
        lora_dropout=0.0,
        target_modules=sorted({path.rpartition(".")[2] for path in adapter.modules}),
        task_type=adapter.config.get("task_type"),
        base_model_name_or_path=adapter.config.get("base_model_name_or_path") or base_model,
        inference_mode=True,
    )
    with _staged(dst) as staging:
        config.save_pretrained(staging)
        save_file(tensors, os.path.join(staging, WEIGHTS_NAME), metadata={"format": "pt"})
    return dst


def _check_output(src: str, dst: str) -> None:
    """Refuse an output that is a file, or the source itself (writing the LoRA form over its own S²FT source would
    destroy the adapter), whatever links or ``..`` spell it."""
    if os.path.exists(dst) and not os.path.isdir(dst):
        raise ValueError(f"The output {dst!r} is a file; name a folder (new or existing) for the LoRA adapter.")
    same = os.path.realpath(src) == os.path.realpath(dst)
    if not same and os.path.exists(src) and os.path.exists(dst):
        same = os.path.samefile(src, dst)
    if same:
        raise ValueError(f"The output folder {dst!r} is the S2FT adapter {src!r} itself; converting in place would "
                         "replace the adapter with its LoRA form. Name another output folder.")


@contextlib.contextmanager
def _staged(dst: str):
    """A staging folder beside ``dst`` whose files move into ``dst`` only when the block succeeds."""
    dst = os.path.abspath(dst)
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".{os.path.basename(dst)}.converting-{uuid.uuid4().hex[:12]}")
    os.mkdir(staging)  # not tempfile.mkdtemp: its 0700 mode would stay on a DST made by renaming the staging folder
    try:
        yield staging
        if not os.path.exists(dst):
            os.rename(staging, dst)
            return
        for name in sorted(os.listdir(staging), key=lambda name: name == CONFIG_NAME):  # the config last
            os.replace(os.path.join(staging, name), os.path.join(dst, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vllm_ext.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument("src", help="S2FT adapter folder")
    parser.add_argument("dst", help="output folder for the PEFT LoRA adapter")
    parser.add_argument("--base-model", help="base model folder or id (default: the adapter's base_model_name_or_path)")
    args = parser.parse_args(argv)
    try:
        print(convert_s2ft_to_lora(args.src, args.dst, args.base_model))
    except ValueError as error:  # a refused folder pair, a malformed adapter, one that does not fit the base model
        parser.exit(2, f"{parser.prog}: error: {error}\n")


if __name__ == "__main__":
    main()
