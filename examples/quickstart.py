"""Offline S2FT quickstart: build a tiny Llama and tokenizer locally, fine-tune with S2FT, save, reload, merge.

    python examples/quickstart.py [--output outputs/quickstart] [--steps 60]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from peft import PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as transformers_logging

import s2ft_plugin  # noqa: F401  registers the PEFT type "S2FT"
from s2ft_plugin import S2FTConfig
from s2ft_plugin.tiny import CORPUS, build_model, save_checkpoint


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="outputs/quickstart")
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    output = Path(args.output)
    transformers_logging.disable_progress_bar()

    base_dir = save_checkpoint(str(output / "tiny-llama"), "llama")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    batch = tokenizer(CORPUS, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    print(f"[1/5] built a tiny Llama and a {len(tokenizer)}-token BPE tokenizer in {base_dir}")

    config = S2FTConfig(task_type="CAUSAL_LM", head_ratio=0.25, channel_ratio=0.1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    trainable, total = model.get_nb_trainable_parameters()
    print(f"[2/5] S2FT on {sorted(config.target_modules)}: {trainable:,} of {total:,} parameters trainable "
          f"({100 * trainable / total:.2f}%)")
    layer = model.get_base_model().model.layers[0]
    heads = layer.self_attn.o_proj.s2ft_indices["default"][:: model.config.head_dim] // model.config.head_dim
    print(f"      layer 0 trains heads {heads.tolist()} and channels {layer.mlp.down_proj.s2ft_indices['default'].tolist()}")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(args.steps):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 0 or step == args.steps - 1:
            print(f"[3/5] step {step + 1:3d}/{args.steps}: loss {loss.item():.3f}")
    model.eval()

    adapter_dir = output / "s2ft-adapter"
    model.save_pretrained(adapter_dir)
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    with torch.no_grad():
        trained_logits = model(**batch).logits
        reload_gap = (reloaded(**batch).logits - trained_logits).abs().max().item()
    print(f"[4/5] saved the adapter to {adapter_dir} and reloaded it: max logit difference {reload_gap:.2e}")

    merged = reloaded.merge_and_unload()
    merged_dir = output / "merged"
    merged.save_pretrained(merged_dir)
    tokenizer.save_pretrained(merged_dir)
    with torch.no_grad():
        merge_gap = (AutoModelForCausalLM.from_pretrained(merged_dir)(**batch).logits - trained_logits).abs().max().item()
        base_gap = (build_model("llama", vocab_size=len(tokenizer))(**batch).logits - trained_logits).abs().max().item()
    print(f"[5/5] merged into a plain checkpoint at {merged_dir}: max logit difference {merge_gap:.2e} "
          f"(the untuned base differs by {base_gap:.2f})")
    prompt = tokenizer("Question: what is the capital of France? Answer:", return_tensors="pt")
    generated = merged.generate(**prompt, max_new_tokens=4, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    print("      merged model says:", tokenizer.decode(generated[0, prompt.input_ids.shape[1]:]).strip())
    if reload_gap > 1e-4 or merge_gap > 1e-4:
        raise SystemExit("reloaded or merged model does not reproduce the trained adapter")


if __name__ == "__main__":
    main()
