"""S2FT -> LoRA conversion, folder checks, tensor-parallel index splitting and the base-token fix, without an engine."""

import json
import os
import shutil
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM
from vllm_support import build_checkpoints

from s2ft_plugin.architectures import LLAMA_NAMES
from s2ft_plugin.structure import ROLES
from vllm_ext.adapter import PACKED, SIDES, MalformedS2FTAdapter, read_s2ft_adapter
from vllm_ext.convert import VLLM_LORA_RANKS, convert_s2ft_to_lora, lora_rank
from vllm_ext.convert import main as convert_main
from vllm_ext.validation import DEFAULT_TARGETS, check_fits_model


CONVERTED = ["inputs", "outputs", "both"]  # k within vLLM's LoRA ranks


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_convert")
    return root, *build_checkpoints(root, CONVERTED)


def test_tables_match_their_sources():
    from vllm.config.lora import MaxLoRARanks

    from vllm.model_executor.models.llama import LlamaForCausalLM

    from s2ft_plugin.architectures import default_target_modules

    assert VLLM_LORA_RANKS == typing.get_args(MaxLoRARanks)
    assert sorted(DEFAULT_TARGETS) == sorted(default_target_modules(AutoConfig.for_model("llama")))
    assert SIDES == {name: ROLES[role][1] for name, role in LLAMA_NAMES.items() if ROLES[role][2] != "fused"}
    assert {packed: list(names) for packed, names in PACKED.items()} == LlamaForCausalLM.packed_modules_mapping


@pytest.mark.parametrize("name", CONVERTED)
def test_converted_lora_merges_to_the_same_weights(checkpoints, name):
    root, base_dir, adapters = checkpoints
    lora_dir = convert_s2ft_to_lora(adapters[name], str(root / f"lora_{name}"))
    config = json.loads(open(f"{lora_dir}/adapter_config.json").read())
    assert config["peft_type"] == "LORA" and config["r"] == config["lora_alpha"] == lora_rank(
        read_s2ft_adapter(adapters[name]).max_k)

    def merged(adapter_dir):
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float64)
        return PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().state_dict()

    want, got = merged(adapters[name]), merged(lora_dir)
    assert want.keys() == got.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6, msg=key)


def _folder_bytes(folder):
    return {path.name: path.read_bytes() for path in sorted(folder.iterdir())}


@pytest.mark.parametrize("spelling", ["same", "dotdot", "symlink"])
def test_converting_an_adapter_onto_itself_is_refused(checkpoints, tmp_path, capsys, spelling):
    _, _, adapters = checkpoints
    src = tmp_path / "adapter"
    shutil.copytree(adapters["inputs"], src)
    before = _folder_bytes(src)
    dst = {"same": src, "dotdot": src / ".." / "adapter", "symlink": tmp_path / "link"}[spelling]
    if spelling == "symlink":
        dst.symlink_to(src, target_is_directory=True)
    with pytest.raises(SystemExit) as exit_info:
        convert_main([str(src), str(dst)])
    assert exit_info.value.code == 2
    assert "is the S2FT adapter" in capsys.readouterr().err
    assert _folder_bytes(src) == before  # still the S2FT adapter, byte for byte
    assert {p.name for p in tmp_path.iterdir()} == ({"adapter", "link"} if spelling == "symlink" else {"adapter"})


def test_a_failed_conversion_leaves_nothing_half_written(checkpoints, tmp_path, monkeypatch):
    import vllm_ext.convert as convert

    _, _, adapters = checkpoints
    previous = tmp_path / "previous"
    convert_s2ft_to_lora(adapters["outputs"], str(previous))  # an earlier conversion, to be overwritten
    existing = tmp_path / "existing"
    shutil.copytree(previous, existing)
    before = _folder_bytes(existing)

    def save_then_crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(convert, "save_file", save_then_crash)
    for dst in (tmp_path / "new", existing):
        with pytest.raises(OSError, match="disk full"):
            convert_s2ft_to_lora(adapters["inputs"], str(dst))
    assert not (tmp_path / "new").exists()
    assert _folder_bytes(existing) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing", "previous"]  # no staging folder left
    monkeypatch.undo()
    # a conversion that succeeds replaces the earlier one whole, like a conversion into a new folder
    convert_s2ft_to_lora(adapters["inputs"], str(existing))
    assert _folder_bytes(existing) == _folder_bytes(Path(convert_s2ft_to_lora(adapters["inputs"],
                                                                              str(tmp_path / "fresh"))))


def test_rank_is_padded_to_vllm_ranks_and_bounded():
    assert [lora_rank(k) for k in (1, 2, 13, 16, 17, 300, 512)] == [1, 8, 16, 16, 32, 320, 512]
    with pytest.raises(ValueError, match="above vLLM's largest LoRA rank 512"):
        lora_rank(513)
    with pytest.raises(ValueError, match="max_lora_rank=64; start it with --max-lora-rank 128"):
        lora_rank(100, max_rank=64)


def _edit(tensors, config, suffix, fn):
    key = next(k for k in tensors if k.endswith(suffix))
    tensors[key] = fn(tensors[key])


MALFORMED = {
    "not S2FT": (lambda t, c: c.update(peft_type="LORA"), "does not declare peft_type 'S2FT'"),
    "config value": (lambda t, c: c.update(head_ratio="lots"), r"adapter_config.json: S2FTConfig.head_ratio must be a "
                                                               r"number, got 'lots' \(str\)."),
    "extra tensor": (lambda t, c: t.update({"base_model.model.lm_head.weight": torch.zeros(2, 2)}),
                     "unexpected tensor"),
    "unknown projection": (lambda t, c: t.update({k.replace("o_proj", "dense"): v.clone() for k, v in t.items()
                                                  if "o_proj" in k}), "dense.s2ft_indices', which has no place"),
    "float indices": (lambda t, c: _edit(t, c, "o_proj.s2ft_indices", torch.Tensor.float), "1-D integer"),
    "duplicates": (lambda t, c: _edit(t, c, "o_proj.s2ft_indices", lambda i: i.clone().fill_(3)), "duplicates"),
    "negative": (lambda t, c: _edit(t, c, "down_proj.s2ft_indices", lambda i: i - 1000), r"lie in \[0, 1024\)"),
    "wrong k": (lambda t, c: _edit(t, c, "down_proj.s2ft_delta", lambda d: d[:, :-1].clone()),
                r"delta of shape \(128, 50\) but this base model needs \(128, 51\)"),
    "nan": (lambda t, c: _edit(t, c, "down_proj.s2ft_delta", lambda d: d * float("nan")), "NaN"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_folders_are_refused_with_the_reason(checkpoints, tmp_path, case):
    _, base_dir, adapters = checkpoints
    edit, message = MALFORMED[case]
    folder = tmp_path / "bad"
    shutil.copytree(adapters["inputs"], folder)
    tensors = load_file(folder / "adapter_model.safetensors")
    config = json.loads((folder / "adapter_config.json").read_text())
    edit(tensors, config)
    save_file(tensors, folder / "adapter_model.safetensors")
    (folder / "adapter_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):  # the folder, then the folder against the model
        check_fits_model(read_s2ft_adapter(str(folder)), AutoConfig.from_pretrained(base_dir))


def test_missing_files_are_refused(tmp_path):
    with pytest.raises(MalformedS2FTAdapter, match="adapter_config.json is missing"):
        read_s2ft_adapter(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "S2FT"}))
    with pytest.raises(MalformedS2FTAdapter, match="adapter_model.safetensors is missing"):
        read_s2ft_adapter(str(tmp_path))


@pytest.mark.parametrize("tp", [2, 4])
def test_tensor_parallel_shards_add_up_to_the_full_delta(tp):
    from vllm_ext.layers import shard_s2ft

    torch.manual_seed(0)
    x = torch.randn(5, 64, dtype=torch.float64)
    indices = torch.tensor([3, 17, 18, 40, 63])
    # input side (row-parallel): every rank gathers its own columns, the all-reduce sums the partial outputs
    delta = torch.randn(8, indices.numel(), dtype=torch.float64)
    size = 64 // tp
    partial = []
    for rank in range(tp):
        local, local_delta = shard_s2ft(indices, delta, 1, rank * size, size)
        partial.append(x[:, rank * size:(rank + 1) * size][:, local] @ local_delta.t())
    torch.testing.assert_close(sum(partial), x[:, indices] @ delta.t())
    # output side (column-parallel): every rank writes its own rows, the all-gather concatenates them
    delta = torch.randn(indices.numel(), 16, dtype=torch.float64)
    h = torch.randn(5, 16, dtype=torch.float64)
    shards = []
    for rank in range(tp):
        local, local_delta = shard_s2ft(indices, delta, 0, rank * size, size)
        shard = torch.zeros(5, size, dtype=torch.float64)
        shard[:, local] += h @ local_delta.t()
        shards.append(shard)
    full = torch.zeros(5, 64, dtype=torch.float64)
    full[:, indices] += h @ delta.t()
    torch.testing.assert_close(torch.cat(shards, dim=1), full)


def test_base_tokens_get_no_adapter_in_a_full_lora_batch():
    from vllm.lora.layers import LoRAMapping
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    from vllm_ext.punica import S2FTPunicaWrapperCPU

    torch.manual_seed(0)
    slots, rank, width = 2, 4, 8
    lora_a = (torch.randn(slots, 1, rank, width),)
    lora_b = (torch.randn(slots, 1, width, rank),)
    x = torch.randn(4, width)
    mapping = LoRAMapping(index_mapping=(1, 0, 2, 0), prompt_mapping=(1, 0, 2, 0), is_prefill=True)
    outputs = {}
    for cls in (PunicaWrapperCPU, S2FTPunicaWrapperCPU):
        wrapper = cls(max_num_batched_tokens=8, max_batches=4, device="cpu")
        wrapper.update_metadata(mapping, [1, 2], slots + 1, 16)
        outputs[cls] = torch.zeros(4, width)
        wrapper.add_lora_linear(outputs[cls], x, lora_a, lora_b, 1.0, (width,))
    expected = torch.stack([x[i] @ lora_a[0][s, 0].t() @ lora_b[0][s, 0].t() if s >= 0 else torch.zeros(width)
                            for i, s in enumerate((0, -1, 1, -1))])
    torch.testing.assert_close(outputs[S2FTPunicaWrapperCPU], expected)
    assert not torch.allclose(outputs[PunicaWrapperCPU], expected)  # vLLM's own: base rows get the last slot


def test_moe_expert_deltas_are_read_and_not_converted(tmp_path):
    from peft import get_peft_model

    from s2ft_plugin import S2FTConfig
    from s2ft_plugin.tiny import build_model

    config = S2FTConfig(task_type="CAUSAL_LM", init_weights=False, target_modules=["o_proj", "experts.gate_up_proj"])
    model = get_peft_model(build_model("mixtral"), config)
    model.save_pretrained(tmp_path / "adapter")
    adapter = read_s2ft_adapter(str(tmp_path / "adapter"))
    saved = model.base_model.model.model.layers[1].mlp.experts
    experts = adapter.experts["model.layers.1.mlp.experts"]
    assert torch.equal(experts.channels, saved.s2ft_indices["default"])
    assert torch.equal(experts.delta("up_proj"), saved.s2ft_up_delta["default"]) and experts.delta("down_proj") is None
    assert set(adapter.modules) == {f"model.layers.{i}.self_attn.o_proj" for i in range(2)}
    with pytest.raises(MalformedS2FTAdapter, match=r"'model\.layers\.0\.mlp\.experts': the converter exports dense "):
        convert_s2ft_to_lora(str(tmp_path / "adapter"), str(tmp_path / "lora"))
    assert not (tmp_path / "lora").exists()


def test_the_k_setting_is_a_variable_vllm_knows(monkeypatch):
    from vllm.platforms import current_platform
    from vllm.plugins import load_general_plugins

    import vllm.envs as envs

    monkeypatch.setenv("VLLM_S2FT_MAX_K", "o_proj=64")
    load_general_plugins()  # what every vLLM process runs before it checks the environment
    for name in [name for name in os.environ if name.startswith("VLLM_") and name not in envs.environment_variables]:
        monkeypatch.delenv(name)  # vLLM's in-process engines of earlier tests leave VLLM_DIST_IDENT behind
    current_platform.validate_environ(hard_fail=True)  # vLLM's own check: raises on VLLM_* variables it does not know
    monkeypatch.setenv("VLLM_S2FT_MAX_KK", "64")
    with pytest.raises(ValueError, match="Unknown vLLM environment variable detected: VLLM_S2FT_MAX_KK"):
        current_platform.validate_environ(hard_fail=True)


def test_vllm_processes_import_neither_peft_nor_bitsandbytes():
    """What the plugin runs in vLLM's workers and front end (the shared checks included) stays light."""
    script = ("import sys, vllm_ext.plugin, vllm_ext.loader, vllm_ext.validation; vllm_ext.plugin.register(); "
              "print(sorted(name for name in ('peft', 'bitsandbytes', 's2ft_plugin') if name in sys.modules))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
