"""Supervised fine-tuning with S²FT, in the style of TRL's own `trl/scripts/sft.py`.

Offline, on a tiny Llama and a small chat dataset built locally (no --model_name_or_path, no --dataset_name):
    python trl_examples/sft_s2ft.py --output_dir runs/s2ft-tiny --max_steps 20 --use_cpu

A real model and dataset, with a YAML config (command-line flags override it):
    python trl_examples/sft_s2ft.py --config trl_examples/sft_s2ft.yaml \
        --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name trl-lib/Capybara

QLoRA-style, on a bitsandbytes 4-bit base (TRL's own --load_in_4bit/--bnb_4bit_quant_type flags; --load_in_8bit too):
    python trl_examples/sft_s2ft.py --config trl_examples/sft_s2ft_4bit.yaml

Several processes (DDP; `--use_cpu` makes them join a gloo group on CPU):
    accelerate launch --config_file trl_examples/accelerate_multi_cpu.yaml trl_examples/sft_s2ft.py --use_cpu \
        --output_dir runs/ddp

Sharded, one process per GPU (FSDP2, FSDP1, DeepSpeed ZeRO-2 or ZeRO-3; the README's support matrix says what works):
    accelerate launch --config_file trl_examples/accelerate_fsdp2.yaml trl_examples/sft_s2ft.py --output_dir runs/fsdp2

The learning rate defaults to 2e-4 (the paper's commonsense rate), not TRL's 2e-5; --learning_rate overrides it.
SFTConfig turns bf16 on by default, which TRL refuses on a machine without an accelerator unless `--use_cpu` is given.
"""

import contextlib
import os

from accelerate import PartialState
from accelerate.utils import DistributedType
from datasets import Dataset, load_dataset
from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config
from trl import ModelConfig, ScriptArguments, SFTConfig, SFTTrainer, TrlParser, get_quantization_config

from s2ft_plugin.script_args import S2FTArguments, select_from_training_data
from s2ft_plugin.tiny import save_checkpoint


# TRL's default learning rate (2e-5) suits full fine-tuning; a few heads and channels barely move at it. The paper
# trains S2FT at 2e-4 on commonsense reasoning and at 1e-3 on arithmetic reasoning. On the real-model quality benchmark
# the gentlest rate that reaches an accuracy forgets least; its 40-step runs needed 2e-3, a full epoch needs less.
S2FT_LEARNING_RATE = 2e-4


def builtin_dataset() -> Dataset:
    pairs = [("What is two plus three?", "Five."), ("What is the capital of France?", "Paris."),
             ("What does S2FT train?", "A few heads and channels of every block."),
             ("Finish: the quick brown fox", "jumps over the lazy dog.")]
    rows = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in pairs]
    return Dataset.from_dict({"messages": rows * 4})


@contextlib.contextmanager
def zero3_init_disabled(training_args):
    """Build the tiny checkpoint whole: under DeepSpeed ZeRO-3 transformers would create it already partitioned."""
    plugin = getattr(training_args, "deepspeed_plugin", None)
    config = getattr(plugin, "dschf", None) or getattr(training_args, "hf_deepspeed_config", None)
    if config is None:
        yield
        return
    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(config)


def check_sharding(trainer):
    """Refuse, before training, what the sharded engines would silently change or fail on deep inside."""
    accelerator = trainer.accelerator
    for engine, variable in ((DistributedType.FSDP, "ACCELERATE_USE_FSDP"),
                             (DistributedType.DEEPSPEED, "ACCELERATE_USE_DEEPSPEED")):
        if os.environ.get(variable, "false").lower() == "true" and accelerator.distributed_type != engine:
            raise ValueError(
                f"The accelerate config asks for {engine.value} but accelerate set up {accelerator.distributed_type.value}"
                " (it runs FSDP and DeepSpeed only on GPUs and other accelerators; with --use_cpu it falls back to DDP)."
            )
    if accelerator.distributed_type != DistributedType.FSDP:
        return
    plugin = accelerator.state.fsdp_plugin
    if plugin.fsdp_version == 1:
        dtypes = sorted({str(param.dtype) for param in trainer.model.parameters()})
        if len(dtypes) > 1:
            raise ValueError(
                f"FSDP1 flattens each wrapped block into one tensor of one dtype, but this model holds {dtypes}: load "
                "the base in float32 (--dtype float32, with mixed_precision bf16 to compute in bf16), set "
                "--s2ft_delta_dtype to the base's dtype (for a 4-bit base also bnb_4bit_quant_storage), or use FSDP2."
            )
    elif plugin.cpu_ram_efficient_loading:
        raise ValueError(
            "fsdp_cpu_ram_efficient_loading with FSDP2: accelerate broadcasts rank 0's DTensor parameters only and "
            "fails on S2FT's index buffers. Set fsdp_cpu_ram_efficient_loading: false."
        )


def main(script_args, training_args, model_args, s2ft_args):
    model_path = model_args.model_name_or_path
    if model_path is None:  # offline default: a tiny Llama and its tokenizer, written once (main process first)
        model_path = os.path.join(training_args.output_dir, "tiny-llama")
        with training_args.main_process_first(desc="build the tiny model"):
            if not os.path.isfile(os.path.join(model_path, "config.json")):
                with zero3_init_disabled(training_args):
                    save_checkpoint(model_path, "llama")
    training_args.model_init_kwargs = dict(dtype=model_args.dtype, **(training_args.model_init_kwargs or {}))
    if script_args.dataset_name:
        dataset = load_dataset(script_args.dataset_name, name=script_args.dataset_config)[script_args.dataset_train_split]
    else:
        dataset = builtin_dataset()

    quantization_config = get_quantization_config(model_args)
    peft_config = s2ft_args.to_config()
    trainer = SFTTrainer(model=model_path, args=training_args, train_dataset=dataset,
                         quantization_config=quantization_config, peft_config=peft_config)

    s2ft_args.cast_deltas(trainer.model)
    check_sharding(trainer)
    if s2ft_args.s2ft_selection != "random":  # a resumed run reloads the saved selection
        select_from_training_data(trainer, s2ft_args.s2ft_calibration_batches)

    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"S2FT adapter saved to {training_args.output_dir}.")
    return trainer


def make_parser():
    parser = TrlParser((ScriptArguments, SFTConfig, ModelConfig, S2FTArguments))
    parser.set_defaults(learning_rate=S2FT_LEARNING_RATE)  # a YAML config, then the command line, override it
    return parser


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
    # torch's documented shutdown: a process group left to the interpreter's exit can abort it from gloo's threads
    # ("terminate called without an active exception", pytorch/pytorch#190489) after the adapter was saved
    PartialState().destroy_process_group()
