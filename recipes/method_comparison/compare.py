"""Our result JSONs beside the published baselines, as one Markdown table.

    python -m recipes.method_comparison.compare [recipes/method_comparison/results/*.json]
"""

from __future__ import annotations

import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
PUBLISHED = os.path.join(HERE, "published_results.json")
COLUMNS = ("experiment", "source", "test accuracy", "forgetting", "train time (s)", "memory max (GiB)",
           "trainable params", "accelerator")


def _gib(value):
    return "n/a" if value is None else f"{value / 2 ** 30:.1f}"


def published_rows(path: str = PUBLISHED) -> list[tuple]:
    with open(path) as handle:
        published = json.load(handle)
    source = f"PEFT {published['source']['commit'][:7]}"
    return [(name, source, f"{r['test_accuracy']:.4f}", f"{r['forgetting']:+.4f}", f"{r['train_time_s']:.0f}",
             _gib(r["accelerator_memory_max"]), f"{r['num_trainable_params']:,}", r["accelerator"])
            for name, r in published["results"].items()]


def result_row(path: str) -> tuple:
    with open(path) as handle:
        result = json.load(handle)
    info, final = result["train_info"], result["train_info"]["metrics"][-1]
    return (result["run_info"]["experiment_name"], "this run", f"{final['test accuracy']:.4f}",
            f"{final['forgetting']:+.4f}", f"{info['train_time']:.0f}", _gib(info["accelerator_memory_max"]),
            f"{info['num_trainable_params']:,}", result["meta_info"]["system_info"]["accelerator"])


def table(result_paths: list[str]) -> str:
    rows = published_rows() + [result_row(path) for path in sorted(result_paths)]
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


if __name__ == "__main__":
    print(table(sys.argv[1:] or glob.glob(os.path.join(HERE, "results", "*.json"))))
