"""Run a script under `accelerate launch` with FSDP or DeepSpeed on CPU processes joined by gloo (tests only).

accelerate 1.15 enables FSDP and DeepSpeed only for accelerator devices: with `use_cpu` it silently falls back to DDP,
without it the processes do not even join one group. This wrapper makes accelerate treat the gloo CPU group like a
multi-GPU one, so the real FSDP1/FSDP2/ZeRO code paths of accelerate, transformers and TRL run here (on a GPU host
too: DeepSpeed is told to use the CPU):

    accelerate launch --config_file trl_examples/accelerate_fsdp2.yaml tests/accelerate_cpu_launch.py SCRIPT ARGS... \
        [--then ARGS...]

Each `--then` runs SCRIPT again with other arguments in the same processes (a resumed run after an uninterrupted one),
which saves a launch.

It also works around a CPU-only torch 2.13 bug: FSDP1 segfaults taking a full state dict with `offload_to_cpu=True`
(accelerate's setting) when the parameters live on the CPU: the "offload" frees the storage it moved from, which is the
one it moved to.
"""

import contextlib
import os
import runpy
import sys

import torch.distributed
from accelerate.state import PartialState
from accelerate.utils import DistributedType
from torch.distributed.fsdp._flat_param import FlatParamHandle

os.environ["ACCELERATE_TORCH_DEVICE"] = "cpu"
# DeepSpeed picks its accelerator when first imported (later, by accelerate): on a GPU host it would pick CUDA for every
# rank, all on one GPU or on devices a 1-GPU host lacks
os.environ["DS_ACCELERATOR"] = "cpu"


def _gloo_as_multi_device(self, cpu=False, sagemaker_dp=False, backend=None):
    return "gloo", DistributedType.MULTI_GPU


@contextlib.contextmanager
def _to_cpu_unless_there(self):
    """FSDP1's "offload to CPU" frees the compute-device copy it just moved from, which on a CPU is the copy itself."""
    if self.device.type == "cpu":
        yield
    else:
        with _to_cpu(self):
            yield


_to_cpu = FlatParamHandle.to_cpu
PartialState._prepare_backend = _gloo_as_multi_device
FlatParamHandle.to_cpu = _to_cpu_unless_there

if __name__ == "__main__":
    script, *rest = sys.argv[1:]
    runs = [[]]
    for arg in rest:
        if arg == "--then":
            runs.append([])
        else:
            runs[-1].append(arg)
    # a script ends its process group when it finishes; here the runs share one, ended below after the last
    PartialState.destroy_process_group = lambda *_, **__: None
    for args in runs:
        sys.argv = [script, *args]
        runpy.run_path(script, run_name="__main__")
    # every run finished: leave without C++ static destructors, where gloo's threads sometimes abort the process
    # ("terminate called without an active exception") after all the work is done
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
