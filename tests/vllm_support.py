"""Shared by the vLLM tests: a tiny Llama on disk, S2FT adapters that change its greedy tokens, and their reference
outputs from the HF model with the adapter merged by PEFT (independent of vllm_ext)."""

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from s2ft_plugin import S2FTConfig
from s2ft_plugin.tiny import build_tokenizer, save_checkpoint

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# input side only (the default targets), output side only (vLLM's packed qkv_proj/gate_up_proj), and both
ADAPTERS = {
    "inputs": dict(seed=1),
    "outputs": dict(target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"], num_heads=1,
                    channel_ratio=0.1, seed=2),
    "both": dict(target_modules=ALL, num_heads=2, num_channels=16, permute=False, seed=3),
}
MAX_LORA_RANK = 64  # "both" selects 2 heads of 32 columns
PROMPTS = ["The quick brown", "Question: what is two", "Adapters fuse by", "0123456789 +"]
MAX_TOKENS = 8


def build_checkpoints(root) -> tuple[str, dict]:
    """(base model folder, {adapter name: S2FT adapter folder}) under ``root``."""
    base_dir = save_checkpoint(str(root / "base"), "llama")
    adapters = {}
    for name, spec in ADAPTERS.items():
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir),
                               S2FTConfig(task_type="CAUSAL_LM", init_weights=False, **spec))
        adapters[name] = str(root / name)
        model.save_pretrained(adapters[name])
    return base_dir, adapters


def prompt_ids() -> list[list[int]]:
    tokenizer = build_tokenizer()
    return [tokenizer(prompt).input_ids for prompt in PROMPTS]


@torch.no_grad()
def reference(base_dir, adapter_dir=None) -> list[tuple[list[int], float]]:
    """(greedy tokens, logprob of the first one) per prompt, from the HF model with the adapter merged."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    results = []
    for ids in prompt_ids():
        tokens = []
        sequence = torch.tensor([ids])
        first_logprob = None
        for _ in range(MAX_TOKENS):
            logprobs = model(sequence).logits[0, -1].float().log_softmax(-1)
            token = int(logprobs.argmax())
            first_logprob = float(logprobs[token]) if first_logprob is None else first_logprob
            tokens.append(token)
            if token == model.config.eos_token_id:
                break
            sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
        results.append((tokens, first_logprob))
    return results
