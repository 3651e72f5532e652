"""S2FT under sharded data parallelism: `accelerate launch` of the TRL example with the shipped FSDP2, FSDP1 and
DeepSpeed ZeRO-2/ZeRO-3 configs, on 2 CPU processes joined by gloo (tests/accelerate_cpu_launch.py lets accelerate run
its FSDP and DeepSpeed paths there). Each engine trains 2 AdamW steps on 2 x 2 sequences and must save the adapter a
single process saves after the same 2 steps on 4 sequences: same original-order indices, same (full) deltas. Score-based
selection must come out identical on every rank."""

import importlib.util
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_trl_examples import ROOT, SCRIPT, adapter, run_in_process

from s2ft_plugin import S2FTConfig, S2FTLayer, initialize_s2ft_selection
from s2ft_plugin.tiny import build_model

LAUNCHER = os.path.join(ROOT, "tests", "accelerate_cpu_launch.py")
# 2 AdamW steps; epsilon 1 keeps each update proportional to the gradient, so the rounding of a sharded reduction
# cannot flip the sign of a near-zero update. Checkpoints every step for the resumed run.
TRAIN = ["--report_to", "none", "--disable_tqdm", "true", "--bf16", "false", "--max_steps", "2",
         "--learning_rate", "1e-2", "--adam_epsilon", "1.0", "--lr_scheduler_type", "constant",
         "--s2ft_target_modules", "q_proj", "o_proj", "up_proj", "down_proj", "--s2ft_num_heads", "1",
         "--s2ft_num_channels", "24"]
CHECKPOINTS = ["--save_strategy", "steps", "--save_steps", "1"]


def launch(config, *runs, port):
    """One `accelerate launch` of the example with the shipped config; each run in `runs` is an argument list."""
    args = [arg for i, run in enumerate(runs) for arg in ([] if i == 0 else ["--then"]) + list(run)]
    command = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--config_file",
               os.path.join(ROOT, "trl_examples", config), "--mixed_precision", "no", "--main_process_port", str(port),
               LAUNCHER, SCRIPT, *args]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The reference: one process, 4 sequences per step, selection scored by activations."""
    out = str(tmp_path_factory.mktemp("single") / "run")
    run_in_process(*TRAIN, "--use_cpu", "--save_strategy", "no", "--per_device_train_batch_size", "4",
                   "--s2ft_selection", "activation", "--output_dir", out)
    return adapter(out)


def assert_same_adapter(got, expected):
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        if key.endswith("s2ft_delta"):
            assert value.dtype == torch.float32 and value.abs().max() > 0, key
            torch.testing.assert_close(got[key], value, rtol=1e-4, atol=1e-7)
        else:  # the selection, in original coordinates
            assert torch.equal(got[key], value), key


def test_fsdp2_matches_a_single_process_saves_the_same_adapter_and_resumes_exactly(tmp_path, single_process):
    """FSDP2: uninterrupted run with a checkpoint per step, then (same launch) a run resumed from step 1."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    sharded = [*TRAIN, "--per_device_train_batch_size", "2", "--s2ft_selection", "activation"]
    launch("accelerate_fsdp2.yaml", [*sharded, *CHECKPOINTS, "--output_dir", str(full)],
           [*sharded, *CHECKPOINTS, "--output_dir", str(resumed), "--resume_from_checkpoint",
            str(full / "checkpoint-1")], port=29561)
    assert_same_adapter(adapter(str(full)), single_process)
    # the checkpoint holds the same adapter format: full deltas and original-order indices
    assert_same_adapter(adapter(str(full / "checkpoint-2")), single_process)
    # resuming restores selection, deltas and AdamW state: step 2 lands where the uninterrupted run's did
    uninterrupted, continued = adapter(str(full)), adapter(str(resumed))
    assert continued.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        torch.testing.assert_close(continued[key], value, rtol=0, atol=0)


def test_fsdp1_matches_a_single_process(tmp_path, single_process):
    launch("accelerate_fsdp1.yaml", [*TRAIN, "--per_device_train_batch_size", "2", "--s2ft_selection", "activation",
                                     "--save_strategy", "no", "--output_dir", str(tmp_path)], port=29562)
    assert_same_adapter(adapter(str(tmp_path)), single_process)


def test_fsdp1_refuses_a_base_and_deltas_of_different_dtypes(tmp_path):
    """FSDP1 would fail deep inside its wrapping (one dtype per flat parameter): the example says how to fix it."""
    with pytest.raises(AssertionError, match="FSDP1 flattens each wrapped block into one tensor of one dtype"):
        launch("accelerate_fsdp1.yaml", [*TRAIN, "--dtype", "bfloat16", "--save_strategy", "no", "--output_dir",
                                         str(tmp_path)], port=29563)
    assert not os.path.exists(tmp_path / "adapter_model.safetensors")


needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None,
    reason="DeepSpeed is not installed (pip install -e '.[deepspeed]'); its ZeRO tests run under `make gpu-check`",
)


@pytest.mark.gpu
@needs_deepspeed
@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_matches_a_single_process(tmp_path, single_process, stage):
    # ZeRO-3 loads the model partitioned: data-based selection is refused there, so both score by weight magnitude
    out = str(tmp_path / "zero")
    launch(f"accelerate_zero{stage}.yaml", [*TRAIN, "--per_device_train_batch_size", "2", "--s2ft_selection",
                                            "weight", "--save_strategy", "no", "--output_dir", out], port=29564 + stage)
    reference = str(tmp_path / "single")
    run_in_process(*TRAIN, "--use_cpu", "--save_strategy", "no", "--per_device_train_batch_size", "4",
                   "--s2ft_selection", "weight", "--output_dir", reference)
    assert_same_adapter(adapter(out), adapter(reference))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU: the shipped configs run as-is under `make gpu-check`")
@pytest.mark.parametrize("config", ["accelerate_fsdp2.yaml", "accelerate_fsdp1.yaml", "accelerate_zero2.yaml",
                                    "accelerate_zero3.yaml"])
def test_shipped_configs_train_on_gpus(tmp_path, single_process, config):
    """The configs exactly as shipped (bf16 mixed precision, NCCL, one process per GPU) train and save an adapter
    with the full shapes and the selection of the CPU reference; the CPU tests above check the numbers."""
    if "zero" in config and importlib.util.find_spec("deepspeed") is None:
        pytest.skip("DeepSpeed is not installed (pip install -e '.[deepspeed]')")
    command = [os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--config_file",
               os.path.join(ROOT, "trl_examples", config), "--num_processes", str(torch.cuda.device_count()),
               "--main_process_port", "29591", SCRIPT, *TRAIN, "--per_device_train_batch_size", "2",
               "--s2ft_selection", "weight" if "zero3" in config else "activation", "--save_strategy", "no",
               "--output_dir", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    saved = adapter(str(tmp_path))
    assert saved.keys() == single_process.keys()
    for key, value in single_process.items():
        assert saved[key].shape == value.shape, key
        if key.endswith("s2ft_delta"):
            assert torch.isfinite(saved[key]).all() and saved[key].abs().max() > 0, key
        elif "zero3" not in config:
            assert torch.equal(saved[key], value), key


# ---------------------------------------------------------------- selection identical on every rank
CALIBRATION = torch.randint(3, 300, (4, 2, 16), generator=torch.Generator().manual_seed(3))  # 4 batches of 2


def _selection(model):
    return {path: layer.s2ft_indices["default"].clone() for path, layer in model.named_modules()
            if isinstance(layer, S2FTLayer)}


def _calibrated_model(selection, batches):
    from peft import get_peft_model

    config = S2FTConfig(task_type="CAUSAL_LM", selection=selection, num_heads=1, num_channels=24,
                        target_modules=["q_proj", "o_proj", "down_proj"])
    model = get_peft_model(build_model("llama"), config)
    initialize_s2ft_selection(model, [{"input_ids": ids} for ids in batches], show_progress_bar=False)
    return model


def _rank_selects(rank, world, port, selection, out):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:  # each rank scores only its own share of the calibration batches
        torch.save(_selection(_calibrated_model(selection, CALIBRATION[rank::world])), f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("selection", ["weight_activation", "gradient"])
def test_score_based_selection_is_identical_on_every_rank(tmp_path, selection):
    """Two gloo ranks, each calibrating on half of the batches, select what one process selects from all of them."""
    mp.spawn(_rank_selects, args=(2, 29571 + len(selection), selection, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    expected = _selection(_calibrated_model(selection, CALIBRATION))
    # with half of the data a rank alone would select differently, so the agreement is the reduction's doing
    assert any(not torch.equal(_selection(_calibrated_model(selection, CALIBRATION[:2]))[path], indices)
               for path, indices in expected.items())
    for got in ranks:
        assert got.keys() == expected.keys()
        for path, indices in expected.items():
            assert torch.equal(got[path], indices), path
