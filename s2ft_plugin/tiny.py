"""Small models and a tokenizer built locally, for the offline demo, tests, examples and benchmarks."""

from __future__ import annotations

import os

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

CORPUS = [
    "Structured sparse fine-tuning trains a few heads and channels of every block.",
    "The quick brown fox jumps over the lazy dog.",
    "Question: what is two plus three? Answer: five.",
    "Question: what is the capital of France? Answer: Paris.",
    "Adapters fuse by addition, switch by overwriting a few columns, and batch by gathering channels.",
    "0123456789 + - * / = ( ) , . ? ! : ;",
]

# name -> transformers config overrides; head_dim 32 because vLLM's CPU attention needs head_dim >= 32
ARCHITECTURES = {
    "llama": dict(model_type="llama", num_attention_heads=4, num_key_value_heads=4),
    "mistral": dict(model_type="mistral", num_attention_heads=4, num_key_value_heads=2),
    "qwen2": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2),
    "qwen3": dict(model_type="qwen3", num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "gemma": dict(model_type="gemma", num_attention_heads=4, num_key_value_heads=1, head_dim=32),
    "gemma2": dict(model_type="gemma2", num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "gemma3_text": dict(model_type="gemma3_text", num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "olmo2": dict(model_type="olmo2", num_attention_heads=4, num_key_value_heads=2),
    "granite": dict(model_type="granite", num_attention_heads=4, num_key_value_heads=2),
    "smollm3": dict(model_type="smollm3", num_attention_heads=4, num_key_value_heads=2),
    "phi3": dict(model_type="phi3", num_attention_heads=4, num_key_value_heads=4),
    "phi": dict(model_type="phi", num_attention_heads=4, num_key_value_heads=4),
    "starcoder2": dict(model_type="starcoder2", num_attention_heads=4, num_key_value_heads=2),
    "opt": dict(model_type="opt", num_attention_heads=4, intermediate_key="ffn_dim", word_embed_proj_dim=None),
    "gptj": dict(model_type="gptj", num_attention_heads=4, intermediate_key="n_inner", rotary_dim=16),
    "gpt2": dict(model_type="gpt2", num_attention_heads=4, intermediate_key="n_inner"),
    "gpt_neox": dict(model_type="gpt_neox", num_attention_heads=4),
    "bloom": dict(model_type="bloom", num_attention_heads=4, intermediate_key=None),
    "falcon": dict(model_type="falcon", num_attention_heads=4, intermediate_key="ffn_hidden_size"),  # multi-query
    "falcon_mha": dict(model_type="falcon", num_attention_heads=4, intermediate_key="ffn_hidden_size",
                       multi_query=False),
    "falcon_gqa": dict(model_type="falcon", num_attention_heads=4, intermediate_key="ffn_hidden_size",
                       new_decoder_architecture=True, num_kv_heads=2),
    # mixture of experts: 4 experts of intermediate_size channels each, top-2 (Llama 4: top-1 plus a shared expert;
    # GPT-OSS: transposed, interleaved gate/up rows with biases)
    "mixtral": dict(model_type="mixtral", num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                    num_experts_per_tok=2),
    "qwen3_moe": dict(model_type="qwen3_moe", num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=4,
                      num_experts_per_tok=2),
    "llama4_text": dict(model_type="llama4_text", num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                        num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1),
    "gpt_oss": dict(model_type="gpt_oss", num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                    num_local_experts=4, num_experts_per_tok=2, rope_parameters=dict(rope_type="default",
                                                                                    rope_theta=10000.0)),
}


def build_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on a built-in corpus: any text encodes, nothing is downloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.chat_template = (
        "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}{{ eos_token }}{% endfor %}"
        "{% if add_generation_prompt %}assistant: {% endif %}"
    )
    return fast


def build_model(
    architecture: str = "llama",
    hidden_size: int = 128,
    intermediate_size: int = 256,
    num_hidden_layers: int = 2,
    vocab_size: int = 384,
    seed: int = 0,
    **overrides,
):
    """A randomly initialised causal LM of the given family (see ``ARCHITECTURES``)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"Unknown tiny architecture {architecture!r}; choose one of {sorted(ARCHITECTURES)}.")
    settings = dict(ARCHITECTURES[architecture])
    model_type = settings.pop("model_type")
    intermediate_key = settings.pop("intermediate_key", "intermediate_size")  # None: fixed at 4 x hidden_size
    if intermediate_key is not None:
        settings[intermediate_key] = intermediate_size
    if settings.get("word_embed_proj_dim", 0) is None:
        settings["word_embed_proj_dim"] = hidden_size
    settings.update(
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    if model_type == "qwen3_moe":  # its experts' width has its own name
        settings["moe_intermediate_size"] = intermediate_size
    settings.update(overrides)
    config = AutoConfig.for_model(model_type, **settings)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def save_checkpoint(path: str, architecture: str = "llama", **model_kwargs) -> str:
    """Write a tiny model and its tokenizer to ``path`` (a folder ``from_pretrained`` and vLLM can load)."""
    os.makedirs(path, exist_ok=True)
    tokenizer = build_tokenizer()
    model = build_model(architecture, vocab_size=len(tokenizer), **model_kwargs)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
