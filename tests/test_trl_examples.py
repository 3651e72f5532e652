"""The TRL example script runs offline on its tiny default: from the command line, from the YAML configs, 4-bit, and
under `accelerate launch` with 2 CPU processes (DDP over gloo), whose delta gradients match a single-process run."""

import importlib.util
import json
import os
import subprocess
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from s2ft_plugin import S2FTLayer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "trl_examples", "sft_s2ft.py")
QUIET = ["--use_cpu", "--report_to", "none", "--disable_tqdm", "true", "--save_strategy", "no"]
# one SGD step from zero deltas, lr 1 and no clipping: the saved delta is minus the gradient
ONE_SGD_STEP = ["--max_steps", "1", "--optim", "sgd", "--learning_rate", "1.0", "--lr_scheduler_type", "constant",
                "--max_grad_norm", "0", "--bf16", "false", "--load_in_4bit",
                "--s2ft_target_modules", "q_proj", "o_proj", "up_proj", "down_proj"]


def example():
    spec = importlib.util.spec_from_file_location("sft_s2ft", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_in_process(*args):
    module = example()
    return module.main(*module.make_parser().parse_args_and_config(args=list(args)))


def run_cli(*args, launcher=()):
    result = subprocess.run([*launcher, SCRIPT, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def adapter(path):
    with open(os.path.join(path, "adapter_config.json")) as handle:
        assert json.load(handle)["peft_type"] == "S2FT"
    return load_file(os.path.join(path, "adapter_model.safetensors"))


def test_learning_rate_defaults_to_the_papers_not_trls_and_yaml_then_cli_override_it(tmp_path):
    parse = example().make_parser().parse_args_and_config
    config = tmp_path / "lr.yaml"
    config.write_text("learning_rate: 5.0e-4\n")
    out = ["--output_dir", str(tmp_path), "--use_cpu"]
    assert parse(args=out)[1].learning_rate == 2e-4  # TRL's SFTConfig default is 2e-5
    assert parse(args=["--config", str(config), *out])[1].learning_rate == 5e-4
    assert parse(args=["--config", str(config), "--learning_rate", "1e-3", *out])[1].learning_rate == 1e-3


def test_cli_with_the_yaml_config_trains_and_saves_an_adapter(tmp_path):
    out = str(tmp_path / "run")
    run_cli("--config", "trl_examples/sft_s2ft.yaml", "--output_dir", out, "--max_steps", "2",
            "--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "1", *QUIET,
            launcher=(sys.executable,))
    with open(os.path.join(out, "adapter_config.json")) as handle:
        config = json.load(handle)
    assert set(config["target_modules"]) == {"down_proj"} and config["channel_ratio"] == 0.09  # from YAML
    tensors = adapter(out)
    deltas = [value for key, value in tensors.items() if key.endswith("s2ft_delta")]
    intermediate = AutoConfig.from_pretrained(os.path.join(out, "tiny-llama")).intermediate_size
    assert len(deltas) == 2 and all(delta.shape[1] == round(0.09 * intermediate) for delta in deltas)
    assert all(delta.abs().max() > 0 for delta in deltas)


def test_4bit_yaml_config_trains_float32_deltas_on_a_quantized_base(tmp_path):
    import bitsandbytes as bnb

    trainer = run_in_process("--config", "trl_examples/sft_s2ft_4bit.yaml", "--output_dir", str(tmp_path),
                             "--max_steps", "2", "--per_device_train_batch_size", "2",
                             "--gradient_accumulation_steps", "1", "--max_length", "64", *QUIET)
    assert trainer.args.learning_rate == 2e-4 and trainer.args.max_steps == 2  # YAML, then the command line
    layers = [module for module in trainer.model.modules() if isinstance(module, S2FTLayer)]
    assert layers and all(isinstance(layer.get_base_layer(), bnb.nn.Linear4bit) for layer in layers)
    assert all(layer.get_base_layer().weight.quant_type == "nf4" for layer in layers)
    assert not trainer.model.peft_config["default"].permute
    for layer in layers:
        delta = layer.s2ft_delta["default"]
        assert delta.dtype == torch.float32 and delta.abs().max() > 0
    saved = adapter(str(tmp_path))
    assert len(saved) == 2 * len(layers)
    for path, layer in trainer.model.get_base_model().named_modules():
        if isinstance(layer, S2FTLayer):
            assert torch.equal(saved[f"base_model.model.{path}.s2ft_delta"], layer.s2ft_delta["default"].detach())
            assert torch.equal(saved[f"base_model.model.{path}.s2ft_indices"], layer.s2ft_indices["default"])


def test_accelerate_launch_with_two_cpu_processes_matches_a_single_process(tmp_path):
    """DDP: 2 processes x 2 sequences give the same delta gradients as 1 process x 4 sequences (4-bit base)."""
    launch = (os.path.join(os.path.dirname(sys.executable), "accelerate"), "launch", "--config_file",
              os.path.join(ROOT, "trl_examples", "accelerate_multi_cpu.yaml"), "--main_process_port", "29517")
    run_cli(*QUIET, *ONE_SGD_STEP, "--per_device_train_batch_size", "2", "--output_dir", str(tmp_path / "ddp"),
            launcher=launch)
    run_in_process(*QUIET, *ONE_SGD_STEP, "--per_device_train_batch_size", "4", "--output_dir",
                   str(tmp_path / "single"))
    ddp, single = adapter(str(tmp_path / "ddp")), adapter(str(tmp_path / "single"))
    assert ddp.keys() == single.keys()
    for key, expected in single.items():
        if key.endswith("s2ft_delta"):
            assert expected.dtype == torch.float32 and expected.abs().max() > 0, key
            torch.testing.assert_close(ddp[key], expected, rtol=1e-4, atol=1e-8)
        else:
            assert torch.equal(ddp[key], expected), key
