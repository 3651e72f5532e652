"""Time to bring an adapter into a vLLM adapter slot, from disk and from vLLM's CPU-side LoRA cache, S2FT vs LoRA of
equal parameter count, with the adapter's bytes on disk, in that cache and in a slot; in one process.

Each method gets its own in-process engine with one slot (``max_loras=1``) and a CPU cache that holds all its adapters
(``max_cpu_loras``): the S2FT engine with S2FT buffers of exactly the adapters' k (``VLLM_S2FT_MAX_K``) and LoRA
buffers of vLLM's smallest rank, the LoRA engine with the smallest ``max_lora_rank`` its adapters allow and no S2FT
buffers. What is timed is the call vLLM makes when a request
names an adapter that is not in a slot, ``WorkerLoRAManager.add_adapter`` (also behind ``LLM.llm_engine.add_lora``),
run inside the worker through ``collective_rpc`` with the device synchronised before the clock stops:

- from disk: the adapter is not cached (``remove_lora`` first), so the call reads and checks the folder, builds vLLM's
  ``LoRAModel``, caches it and copies it into the slot, evicting the adapter there. "cold": the files' pages were
  dropped from the OS page cache first (fsync, then ``posix_fadvise(DONTNEED)``, which the kernel may ignore);
  "warm": they were just read.
- from the CPU cache: the adapter is cached and another one holds the slot: the call copies it into the slot.

Medians over ``--adapters`` adapters x ``--repeats`` rounds. Bytes: the adapter's folder; the tensors of its cached
``LoRAModel``; and the slot memory the engine reserves (the tensors its LoRA layers hold beside the base weights,
divided by ``max_loras``), which every slot costs whoever fills it.

    python benchmarks/vllm_switch.py [--adapters 8] [--repeats 3] [--hidden 1024] ...
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import tempfile
import time
from datetime import date

import torch

from vllm_common import (
    add_model_args,
    describe,
    folder_bytes,
    parse,
    S2FT_ENGINE_RANK,
    s2ft_max_k,
    save_adapters,
    save_base,
    start_engine,
    stop_engine,
    synchronize,
)

KINDS = ("disk, cold", "disk, warm", "CPU cache")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", type=int, default=8, help="adapters per method (all fit the CPU cache)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over the adapters")
    add_model_args(parser)
    return parse(parser)


def drop_page_cache(folder: str) -> None:
    for name in os.listdir(folder):
        fd = os.open(os.path.join(folder, name), os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _timed_add(worker, request) -> float:
    """Seconds of the worker's own adapter switch (runs inside the worker)."""
    manager = worker.model_runner.lora_manager
    synchronize()
    start = time.perf_counter()
    manager.add_adapter(request)
    synchronize()
    return time.perf_counter() - start


def _tensor_bytes(values, seen: set) -> int:
    """Bytes of the distinct storages among ``values`` and the tensors their lists, tuples, dicts and dataclasses
    hold."""
    total = 0
    for value in values:
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = vars(value)
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()
        elif isinstance(value, (list, tuple)):
            total += _tensor_bytes(value, seen)
        elif isinstance(value, dict):
            total += _tensor_bytes(value.values(), seen)
    return total


def _cached_bytes(worker, lora_id: int) -> int:
    """Bytes of the tensors vLLM's CPU cache holds for one adapter (runs inside the worker)."""
    lora_model = worker.model_runner.lora_manager._adapter_manager.get_adapter(lora_id)
    return _tensor_bytes([vars(weights) for weights in lora_model.loras.values()], set())


def _slot_bytes(worker) -> int:
    """Bytes the LoRA layers hold beside their base layers, per slot (runs inside the worker)."""
    manager = worker.model_runner.lora_manager._adapter_manager
    seen = {p.untyped_storage().data_ptr() for p in manager.model.parameters()}
    held = [value for module in manager.modules.values() for name, value in vars(module).items()
            if name != "base_layer"]
    held += [buffer for module in manager.modules.values() for buffer in module.buffers(recurse=False)]
    return _tensor_bytes(held, seen) // manager.lora_slots


def switch_times(base_dir: str, folders: list, max_lora_rank: int, max_k: str, args) -> tuple[dict, int, int]:
    """({kind: median seconds}, cached bytes of one adapter, slot bytes) on a fresh one-slot engine."""
    from vllm.lora.request import LoRARequest

    llm = start_engine(base_dir, args, max_loras=1, max_lora_rank=max_lora_rank, s2ft_max_k=max_k,
                       max_cpu_loras=len(folders), max_model_len=64, max_num_seqs=4)
    requests = [LoRARequest(os.path.basename(path), i + 1, path) for i, path in enumerate(folders)]

    def add(request) -> float:
        return llm.collective_rpc(_timed_add, args=(request,))[0]

    add(requests[0])  # first-call work (imports, allocator warm-up) is not a switch
    llm.llm_engine.remove_lora(requests[0].lora_int_id)
    times = {kind: [] for kind in KINDS}
    for _ in range(args.repeats):
        for request in requests:
            llm.llm_engine.remove_lora(request.lora_int_id)
            drop_page_cache(request.lora_path)
            times["disk, cold"].append(add(request))
            llm.llm_engine.remove_lora(request.lora_int_id)
            times["disk, warm"].append(add(request))
        for request in requests:  # every adapter is cached; the slot holds the previous one
            times["CPU cache"].append(add(request))
    cached = llm.collective_rpc(_cached_bytes, args=(requests[0].lora_int_id,))[0]
    slot = llm.collective_rpc(_slot_bytes)[0]
    stop_engine(llm)
    return {kind: statistics.median(values) for kind, values in times.items()}, cached, slot


def main():
    args = parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engines one after another, workers in-process
    from vllm_ext.convert import lora_rank

    with tempfile.TemporaryDirectory() as root:
        base_dir = save_base(args, root)
        folders, parameters = save_adapters(base_dir, args, root, args.adapters)
        ranks = {"s2ft": S2FT_ENGINE_RANK, "lora": lora_rank(parameters["lora_rank"])}
        max_k = {"s2ft": s2ft_max_k(folders["s2ft"][0]), "lora": "0"}
        disk = {method: folder_bytes(folders[method][0]) for method in ranks}
        results = {method: switch_times(base_dir, folders[method], ranks[method], max_k[method], args)
                   for method in ranks}

    mib, ms = 2**20, 1e3
    print(f"\n{date.today()}, {describe(args)}")
    print(f"one slot (max_loras=1), {args.adapters} adapters per method in the CPU cache, median of "
          f"{args.adapters} x {args.repeats} switches; times are WorkerLoRAManager.add_adapter in the worker\n")
    print("| method | parameters | on disk (MiB) | in CPU cache (MiB) | slot memory (MiB) | "
          + " | ".join(f"from {kind} (ms)" for kind in KINDS) + " |")
    print("| --- |" + " ---: |" * (4 + len(KINDS)))
    for method, label in (("s2ft", "S2FT"), ("lora", f"LoRA r={parameters['lora_rank']}")):
        times, cached, slot = results[method]
        print(f"| {label} (max_lora_rank {ranks[method]}, VLLM_S2FT_MAX_K={max_k[method]}) | {parameters[method]:,} | "
              f"{disk[method] / mib:.2f} | "
              f"{cached / mib:.2f} | {slot / mib:.2f} | " + " | ".join(f"{times[kind] * ms:.2f}" for kind in KINDS)
              + " |")
    ratios = ", ".join(f"{kind} {results['s2ft'][0][kind] / results['lora'][0][kind]:.2f}x" for kind in KINDS)
    print(f"\nS2FT switch time / LoRA switch time: {ratios}")


if __name__ == "__main__":
    main()
