"""Time to bring an adapter into a vLLM adapter slot, from disk and from vLLM's CPU-side LoRA cache, S2FT vs LoRA of
equal parameter count, with the adapter's bytes on disk, in that cache and in a slot; in one process.

Each method gets its own in-process engine with one slot (``max_loras=1``) and a CPU cache that holds all its adapters
(``max_cpu_loras``): the S2FT engine with S2FT buffers of exactly the adapters' k (``VLLM_S2FT_MAX_K``) and LoRA
buffers of vLLM's smallest rank, the LoRA engine with the smallest ``max_lora_rank`` its adapters allow and no S2FT
buffers. What is timed is the call vLLM makes when a request
names an adapter that is not in a slot, ``WorkerLoRAManager.add_adapter`` (also behind ``LLM.llm_engine.add_lora``),
run inside the worker through ``collective_rpc`` with the device synchronised before the clock stops:

- from disk: the adapter is not cached (``remove_lora`` first), so the call reads the folder, builds vLLM's
  ``LoRAModel``, caches it and copies it into the slot, evicting the adapter there. "first load": the adapter's
  first, which is the only one where S2FT checks the folder (a worker remembers a folder that passed, by its files);
  "cold": the files' pages were dropped from the OS page cache first (fsync, then ``posix_fadvise(DONTNEED)``, which
  the kernel may ignore), as for the first load; "warm": they were just read. S2FT reads the weights into memory,
  vLLM maps LoRA files (their bytes are read when the copy into the slot touches them).
- from the CPU cache: the adapter is cached and another one holds the slot: the call copies it into the slot.

Medians over ``--adapters`` adapters x ``--repeats`` rounds. Bytes: the adapter's folder; the tensors of its cached
``LoRAModel``; and the slot memory the engine reserves (the tensors its LoRA layers hold beside the base weights,
divided by ``max_loras``), which every slot costs whoever fills it.

Where a switch's time goes (:class:`Phases`; per phase the median over the same switches, robust to a busy spell of
the machine, so the phases need not add up exactly to the median switch): reading the folder (S2FT:
``vllm_ext.loader.read_s2ft_adapter``; LoRA: vLLM's safetensors reading in ``LoRAModel.from_local_checkpoint``),
checking it (S2FT: ``vllm_ext.loader.servable_projections``; LoRA: ``PEFTHelper`` and the manager's validations),
building vLLM's objects (the rest of the load, and the manager's ``add_adapter``, which packs qkv/gate_up modules) and
copying into the slot (the manager's ``activate_adapter``). The CPU-cache switch is also set beside its bytes over the
read bandwidth measured in the worker (issue 18's target: within 3x).

    python benchmarks/vllm_switch.py [--adapters 8] [--repeats 3] [--hidden 1024] ...
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
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
FIRST = "disk, first load"  # an adapter's first load (cold): the only one that checks the folder
PHASES = ("read", "checks", "build", "copy into slot")


class Phases:
    """Seconds spent in each phase of the switches since :meth:`reset`, by wrapping the functions that make them up
    (the engines run in this process). A phase's time excludes the wrapped calls nested in it."""

    def __init__(self):
        self.seconds = dict.fromkeys(PHASES, 0.0)
        self._children = []  # per open call: seconds of the wrapped calls nested in it

    def reset(self) -> dict:
        seconds, self.seconds = self.seconds, dict.fromkeys(PHASES, 0.0)
        return seconds

    def wrap(self, owner, name: str, phase: str) -> None:
        """Time ``owner.name`` (a function of a module, or a method, classmethod or staticmethod of a class)."""
        raw = next(vars(place)[name] for place in getattr(owner, "__mro__", [owner]) if name in vars(place))
        kind = type(raw) if isinstance(raw, (classmethod, staticmethod)) else None
        original = raw.__func__ if kind else raw

        @functools.wraps(original)
        def timed(*args, **kwargs):
            self._children.append(0.0)
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                elapsed = time.perf_counter() - start
                self.seconds[phase] += elapsed - self._children.pop()
                if self._children:
                    self._children[-1] += elapsed

        setattr(owner, name, kind(timed) if kind else timed)


def install_phases() -> Phases:
    """Wrap what an adapter switch calls, for S2FT (vllm_ext's loader) and LoRA (vLLM's), in this process."""
    from vllm.lora.lora_model import LoRAModel
    from vllm.lora.model_manager import LoRAModelManager, LRUCacheLoRAModelManager
    from vllm.lora.peft_helper import PEFTHelper
    from vllm.lora.worker_manager import LRUCacheWorkerLoRAManager

    import vllm_ext.loader
    from vllm_ext.plugin import register

    register()  # the plugin's loader first: the wrappers go around it
    phases = Phases()
    phases.wrap(LRUCacheWorkerLoRAManager, "_load_adapter", "build")  # what the phases below leave of a load
    phases.wrap(vllm_ext.loader, "read_s2ft_adapter", "read")
    phases.wrap(vllm_ext.loader, "servable_projections", "checks")
    phases.wrap(LoRAModel, "from_local_checkpoint", "read")  # the safetensors reads; less the tensors' conversion:
    phases.wrap(LoRAModel, "from_lora_tensors", "build")
    phases.wrap(PEFTHelper, "from_local_dir", "checks")
    phases.wrap(PEFTHelper, "validate_legal", "checks")
    for name in ("_validate_moe_lora_format", "_validate_modules_to_save", "_validate_token_classification_lora"):
        phases.wrap(LoRAModelManager, name, "checks")
    phases.wrap(LRUCacheLoRAModelManager, "add_adapter", "build")
    phases.wrap(LRUCacheLoRAModelManager, "activate_adapter", "copy into slot")
    return phases


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


def switch_times(base_dir: str, folders: list, max_lora_rank: int, max_k: str, phases: Phases, args):
    """({kind: median seconds}, {kind: {phase: median seconds}}, cached bytes of one adapter, slot bytes, read
    bandwidth) on a fresh one-slot engine."""
    from vllm.lora.request import LoRARequest

    from vllm_common import worker_read_bandwidth

    llm = start_engine(base_dir, args, max_loras=1, max_lora_rank=max_lora_rank, s2ft_max_k=max_k,
                       max_cpu_loras=len(folders), max_model_len=64, max_num_seqs=4)
    requests = [LoRARequest(os.path.basename(path), i + 1, path) for i, path in enumerate(folders)]
    times = {kind: [] for kind in (FIRST, *KINDS)}
    parts = {kind: {phase: [] for phase in PHASES} for kind in times}

    def add(request, kind=None) -> None:
        phases.reset()
        seconds = llm.collective_rpc(_timed_add, args=(request,))[0]
        if kind is not None:
            times[kind].append(seconds)
            for phase, value in phases.reset().items():
                parts[kind][phase].append(value)

    add(requests[0])  # first-call work (imports, allocator warm-up) is not a switch
    llm.llm_engine.remove_lora(requests[0].lora_int_id)
    for request in requests[1:]:
        drop_page_cache(request.lora_path)
        add(request, FIRST)
        llm.llm_engine.remove_lora(request.lora_int_id)
    for _ in range(args.repeats):
        for request in requests:
            llm.llm_engine.remove_lora(request.lora_int_id)
            drop_page_cache(request.lora_path)
            add(request, "disk, cold")
            llm.llm_engine.remove_lora(request.lora_int_id)
            add(request, "disk, warm")
        for request in requests:  # every adapter is cached; the slot holds the previous one
            add(request, "CPU cache")
    cached = llm.collective_rpc(_cached_bytes, args=(requests[0].lora_int_id,))[0]
    slot = llm.collective_rpc(_slot_bytes)[0]
    bandwidth = llm.collective_rpc(worker_read_bandwidth, args=(args.platform,))[0]
    stop_engine(llm)
    medians = {kind: statistics.median(values) for kind, values in times.items()}
    breakdown = {kind: {phase: statistics.median(values) for phase, values in parts[kind].items()} for kind in times}
    return medians, breakdown, cached, slot, bandwidth


def main():
    args = parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engines one after another, workers in-process
    from vllm_ext.convert import lora_rank

    phases = install_phases()
    with tempfile.TemporaryDirectory() as root:
        base_dir = save_base(args, root)
        folders, parameters = save_adapters(base_dir, args, root, args.adapters)
        ranks = {"s2ft": S2FT_ENGINE_RANK, "lora": lora_rank(parameters["lora_rank"])}
        max_k = {"s2ft": s2ft_max_k(folders["s2ft"][0]), "lora": "0"}
        disk = {method: folder_bytes(folders[method][0]) for method in ranks}
        results = {method: switch_times(base_dir, folders[method], ranks[method], max_k[method], phases, args)
                   for method in ranks}

    mib, ms = 2**20, 1e3
    labels = {"s2ft": "S2FT", "lora": f"LoRA r={parameters['lora_rank']}"}
    print(f"\n{date.today()}, {describe(args)}")
    print(f"one slot (max_loras=1), {args.adapters} adapters per method in the CPU cache, median of "
          f"{args.adapters} x {args.repeats} switches ({args.adapters - 1} first loads); times are "
          "WorkerLoRAManager.add_adapter in the worker\n")
    print("| method | parameters | on disk (MiB) | in CPU cache (MiB) | slot memory (MiB) | "
          + " | ".join(f"from {kind} (ms)" for kind in (FIRST, *KINDS)) + " |")
    print("| --- |" + " ---: |" * (5 + len(KINDS)))
    for method, label in labels.items():
        times, _, cached, slot, _ = results[method]
        print(f"| {label} (max_lora_rank {ranks[method]}, VLLM_S2FT_MAX_K={max_k[method]}) | {parameters[method]:,} | "
              f"{disk[method] / mib:.2f} | "
              f"{cached / mib:.2f} | {slot / mib:.2f} | "
              + " | ".join(f"{times[kind] * ms:.2f}" for kind in (FIRST, *KINDS)) + " |")

    print("\nWhere the time goes (ms, median of each phase over the same switches; the median switch beside them):\n")
    print("| method | from | " + " | ".join(PHASES) + " | switch |")
    print("| --- | --- |" + " ---: |" * (len(PHASES) + 1))
    for method, label in labels.items():
        for kind in (FIRST, *KINDS):
            parts = results[method][1][kind]
            print(f"| {label} | {kind} | " + " | ".join(f"{parts[phase] * ms:.2f}" for phase in PHASES)
                  + f" | {results[method][0][kind] * ms:.2f} |")

    s2ft_times, _, s2ft_cached, _, bandwidth = results["s2ft"]
    lora_times = results["lora"][0]
    floor = s2ft_cached / bandwidth
    print(f"\nread bandwidth measured in the S2FT engine's worker: {bandwidth / 1e9:.1f} GB/s; an S2FT adapter's "
          f"{s2ft_cached / mib:.2f} MiB take {floor * ms:.2f} ms to read at it")
    checks = [(f"from {kind}: S2FT <= LoRA", s2ft_times[kind] / lora_times[kind], 1.0) for kind in KINDS]
    checks.append(("from the CPU cache: S2FT within 3x its bytes over the bandwidth", s2ft_times["CPU cache"] / floor,
                   3.0))
    for text, value, target in checks:
        print(f"target {text}: {value:.2f}x, {'met' if value <= target else 'NOT met'}")


if __name__ == "__main__":
    main()
