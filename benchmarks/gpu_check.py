"""Every GPU-relevant test and benchmark in one run, with a summary to paste into BENCHMARKS.md (``make gpu-check``).

Steps: the tests marked ``gpu`` (sharded TRL training with the shipped FSDP/ZeRO configs, vLLM on CUDA with CUDA graphs
against the HF model), the training-step and MoE benchmarks on CUDA in bf16, and the vLLM serving throughput and
adapter-switch benchmarks (on the CUDA build of vLLM). Each step runs in its own process and its output goes to
``--out``/STEP.log; a step whose package is missing is reported as not run. The summary (``--out``/summary.md, also
printed) lists each step's result with the tables the benchmarks printed. Exits non-zero unless every step passed.

    python benchmarks/gpu_check.py [--out gpu-check]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys
import time
from datetime import date

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# name -> (command after the interpreter, package it needs or None)
STEPS = {
    "pytest -m gpu": (["-m", "pytest", "-m", "gpu", "-q", "tests"], None),
    "train_step (cuda, bf16)": (["benchmarks/train_step.py", "--device", "cuda", "--dtype", "bfloat16"], None),
    "moe_step (cuda)": (["benchmarks/moe_step.py", "--device", "cuda"], None),
    "vllm_throughput": (["benchmarks/vllm_throughput.py"], "vllm"),
    "vllm_switch": (["benchmarks/vllm_switch.py"], "vllm"),
}
PYTEST_SUMMARY = re.compile(r"^(SKIPPED|FAILED|ERROR) |(^|= )\d+ (passed|failed|skipped|errors?|deselected)\b|no tests ran")


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "gpu-check"), help="folder for the logs and summary.md")
    return parser.parse_args()


def environment() -> str:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit(f"gpu_check needs a CUDA GPU, and torch {torch.__version__} (CUDA {torch.version.cuda}) in "
                         f"{sys.prefix} sees none (a CPU build of torch, no driver, or a driver older than that CUDA "
                         "needs). On CPU machines run `make test` and the benchmarks.")
    versions = [f"torch {torch.__version__} (CUDA {torch.version.cuda})"]
    for package in ("vllm", "transformers", "peft", "trl", "deepspeed", "bitsandbytes"):
        try:
            versions.append(f"{package} {importlib.metadata.version(package)}")
        except importlib.metadata.PackageNotFoundError:
            versions.append(f"{package} not installed")
    return f"{date.today()}, {torch.cuda.device_count()} x {torch.cuda.get_device_name()}; " + ", ".join(versions)


def run(name: str, command: list, needs: str | None, out: str) -> tuple[str, float, list]:
    """(result, seconds, lines for the summary) of one step."""
    if needs is not None and importlib.util.find_spec(needs) is None:
        return f"not run: {needs} is not installed (pip install -e '.[{needs}]')", 0.0, []
    log = os.path.join(out, re.sub(r"\W+", "_", name).strip("_") + ".log")
    start = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run([sys.executable, *command], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    seconds = time.perf_counter() - start
    with open(log) as f:
        lines = [line.rstrip("\n") for line in f]
    if command[:2] == ["-m", "pytest"]:
        kept = [line for line in lines if PYTEST_SUMMARY.search(line)]
    elif code == 0:  # the benchmark's report: from its dated first line on (every benchmark prints one)
        dated = [i for i, line in enumerate(lines) if str(date.today()) in line]
        kept = lines[dated[-1] if dated else -60:]
    else:
        kept = []
    if code:
        kept += [f"(exit code {code}; the last lines of {log}:)", *lines[-15:]]
    return ("passed" if code == 0 else "FAILED"), seconds, kept


def main():
    args = parse_args()
    header = environment()
    os.makedirs(args.out, exist_ok=True)
    results = {}
    for name, (command, needs) in STEPS.items():
        print(f"gpu_check: {name} ...", flush=True)
        results[name] = run(name, command, needs, args.out)
        print(f"gpu_check: {name}: {results[name][0]} ({results[name][1]:.0f} s)", flush=True)

    summary = [f"GPU check: {header}", "", "| step | result | seconds |", "| --- | --- | ---: |"]
    summary += [f"| {name} | {result} | {seconds:.0f} |" for name, (result, seconds, _) in results.items()]
    for name, (_, _, lines) in results.items():
        if lines:
            summary += ["", f"### {name}", "", *lines]
    text = "\n".join(summary) + "\n"
    with open(os.path.join(args.out, "summary.md"), "w") as f:
        f.write(text)
    print("\n" + text)
    sys.exit(0 if all(result == "passed" for result, _, _ in results.values()) else 1)


if __name__ == "__main__":
    main()
