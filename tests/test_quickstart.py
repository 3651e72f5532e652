"""The README's main job runs offline end to end (it exits non-zero if reload or merge changes the logits)."""

import subprocess
import sys
from pathlib import Path

from peft import PeftModel
from transformers import AutoModelForCausalLM

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_trains_saves_reloads_and_merges(tmp_path):
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "quickstart.py"), "--output", str(tmp_path), "--steps", "15"],
        check=True, capture_output=True, text=True,
    )
    losses = [float(line.rsplit("loss", 1)[1]) for line in result.stdout.splitlines() if "loss" in line]
    assert len(losses) == 2 and losses[1] < losses[0]
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-llama")
    merged = PeftModel.from_pretrained(base, tmp_path / "s2ft-adapter").merge_and_unload()
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    for name, tensor in exported.state_dict().items():
        assert (merged.state_dict()[name] - tensor).abs().max() < 1e-6, name
