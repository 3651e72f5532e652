"""vLLM (front end and workers) and the converter accept exactly the S2FT adapters PEFT's loader accepts, refusing the
others for PEFT's reason; the modules and row/column counts they expect from a config are the ones PEFT builds."""

import json
import shutil

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from s2ft_plugin import S2FTConfig, S2FTLayer
from s2ft_plugin.tiny import save_checkpoint
from vllm_ext.adapter import read_s2ft_adapter
from vllm_ext.convert import convert_s2ft_to_lora
from vllm_ext.convert import main as convert_main
from vllm_ext.validation import adapted_projections, check_servable

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# grouped-query attention (4 query heads in 2 groups of 32-wide heads), 256 FFN channels, 2 layers
MODEL = dict(hidden_size=128, intermediate_size=256)


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm_validation")
    return {layers: save_checkpoint(str(root / f"base{layers}"), "mistral", num_hidden_layers=layers, **MODEL)
            for layers in (2, 4)}


def saved(base_dir, folder, **options):
    torch.manual_seed(0)
    config = S2FTConfig(task_type="CAUSAL_LM", init_weights=False, **options)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), config)
    model.save_pretrained(folder)
    return model


CONFIGS = {
    "default": {},
    "ratios": dict(head_ratio=0.6, channel_ratio=0.3),
    "every projection, 3 heads of 2 groups": dict(target_modules=ALL, num_heads=3, num_channels=5),
    "unit_pattern": dict(target_modules=ALL, num_channels=2,
                         unit_pattern={"k_proj": 1, "q_proj": 3, r"layers\.1\.mlp\.down_proj": 7}),
    "layers_to_transform": dict(target_modules=ALL, layers_to_transform=[1]),
    "layers_pattern": dict(layers_to_transform=0, layers_pattern="layers"),
    "regex": dict(target_modules=r".*\.1\.mlp\.(up|down)_proj"),
    "exclude_modules": dict(target_modules=ALL, exclude_modules=["model.layers.0.self_attn.o_proj", "gate_proj"]),
    "a full name ignores layers_to_transform": dict(target_modules=["model.layers.1.self_attn.o_proj", "down_proj"],
                                                    layers_to_transform=[0]),
}


@pytest.mark.parametrize("options", CONFIGS.values(), ids=list(CONFIGS))
def test_the_projections_expected_from_a_config_are_the_ones_peft_builds(bases, tmp_path, options):
    model = saved(bases[2], tmp_path, **options)
    built = {path: (layer.side, layer.out_features, layer.in_features, layer.unit_size, layer.selected_count("default"))
             for path, layer in model.get_base_model().named_modules() if isinstance(layer, S2FTLayer)}
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    expected = adapted_projections(config, AutoConfig.from_pretrained(bases[2]))
    assert {path: (p.side, p.out_features, p.in_features, p.unit_size, p.count)
            for path, p in expected.items()} == built


def _edit_tensors(edit):
    def apply(folder):
        tensors = load_file(folder / "adapter_model.safetensors")
        edit(tensors)
        save_file(tensors, folder / "adapter_model.safetensors")
    return apply


def _edit_config(**changes):
    def apply(folder):
        config = json.loads((folder / "adapter_config.json").read_text())
        config.update(changes)
        (folder / "adapter_config.json").write_text(json.dumps(config))
    return apply


def _tensor(suffix, fn):
    def edit(tensors):
        key = next(k for k in tensors if k.endswith(suffix))
        tensors[key] = fn(tensors[key])
    return edit


def _drop_layer(index):
    def edit(tensors):
        for key in [k for k in tensors if f".layers.{index}." in k]:
            del tensors[key]
    return edit


ADAPTER = dict(target_modules=ALL, num_heads=3, num_channels=8)  # k: 96 query rows, 64 key/value rows, 8 channels
# case -> (how the folder differs from ADAPTER's on the 2-layer base, PEFT's reason for refusing it; None: it fits)
CASES = {
    "fits": (None, None),
    "head_ratio lots": (_edit_config(head_ratio="lots"), "S2FTConfig.head_ratio must be a number, got 'lots' (str)"),
    "unknown selection": (_edit_config(selection="best"), "S2FTConfig.selection must be one of"),
    "incomplete": (_edit_tensors(_drop_layer(1)), "has no indices; the adapter was saved for other target modules or "
                                                  "is incomplete"),
    "deeper model": ("deeper", "which has no place in this model"),
    "config lost a target": (_edit_config(target_modules=[n for n in ALL if n != "v_proj"]),
                             "v_proj.s2ft_indices', which has no place in this model"),
    "another head count": (_edit_config(num_heads=2), "96 indices but the config gives this layer 64"),
    "too many heads": (_edit_config(num_heads=9), "S2FTConfig asks for 9 heads per block but the model has only 4"),
    "unit_pattern too large": (_edit_config(unit_pattern={"k_proj": 3}),
                               "unit_pattern gives 'model.layers.0.self_attn.k_proj' 3 units but it has only 2"),
    "layer index the model lacks": (_edit_config(layers_to_transform=[7]), "names layer(s) [7] but no target module"),
    "part of a head": (_edit_tensors(_tensor("layers.0.self_attn.o_proj.s2ft_indices", lambda i: torch.arange(96) + 1)),
                       "indices must cover whole heads of 32 rows/columns"),
    "out of range": (_edit_tensors(_tensor("down_proj.s2ft_indices", lambda i: i + 10_000)),
                     "indices must lie in [0, 256)"),
    "duplicates": (_edit_tensors(_tensor("down_proj.s2ft_indices", lambda i: i.clone().fill_(3))),
                   "indices contain duplicates"),
    "float indices": (_edit_tensors(_tensor("down_proj.s2ft_indices", torch.Tensor.float)),
                      "indices must be a 1-D integer tensor"),
    "delta shape": (_edit_tensors(_tensor("o_proj.s2ft_delta", lambda d: d[:-1].clone())),
                    "has a delta of shape (127, 96) but this base model needs (128, 96)"),
    "nan": (_edit_tensors(_tensor("gate_proj.s2ft_delta", lambda d: d * float("nan"))),
            "has a delta holding NaN or infinite values"),
}


def _verdict(load):
    try:
        load()
    except (TypeError, ValueError) as error:
        return str(error)
    return None


@pytest.mark.parametrize("case", list(CASES))
def test_vllm_and_the_converter_refuse_what_peft_refuses(bases, tmp_path, monkeypatch, case):
    change, reason = CASES[case]
    folder = tmp_path / "adapter"
    saved(bases[4] if change == "deeper" else bases[2], folder, **ADAPTER)
    if callable(change):
        change(folder)
    monkeypatch.setenv("VLLM_S2FT_MAX_K", "1024")  # buffers for every projection: only the adapter is judged
    verdicts = {
        "PEFT": _verdict(lambda: PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bases[2]), folder)),
        "vLLM": _verdict(lambda: check_servable(read_s2ft_adapter(str(folder)), AutoConfig.from_pretrained(bases[2]))),
        "converter": _verdict(lambda: convert_s2ft_to_lora(str(folder), str(tmp_path / "lora"), bases[2])),
    }
    if reason is None:
        assert verdicts == dict.fromkeys(verdicts), verdicts
    else:
        assert all(verdict is not None and reason in verdict for verdict in verdicts.values()), verdicts
        assert not (tmp_path / "lora").exists()


def test_the_converter_refuses_an_adapter_of_a_deeper_model(bases, tmp_path, capsys):
    """Issue 15, row 6: it wrote LoRA tensors for layers the base lacks, and PEFT loaded them without a word."""
    saved(bases[4], tmp_path / "deep", **ADAPTER)
    with pytest.raises(SystemExit) as exit_info:
        convert_main([str(tmp_path / "deep"), str(tmp_path / "lora"), "--base-model", bases[2]])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "holds 'model.layers.2." in error and "which has no place in this model" in error
    assert sorted(path.name for path in tmp_path.iterdir()) == ["deep"]
    # with the base it was trained on, the same folder converts
    convert_main([str(tmp_path / "deep"), str(tmp_path / "lora"), "--base-model", bases[4]])
    assert (tmp_path / "lora" / "adapter_model.safetensors").exists()
    shutil.rmtree(tmp_path / "lora")
