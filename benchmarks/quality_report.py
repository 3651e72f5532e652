"""The quality benchmark's summaries: mean ± std over seeds, markdown tables and the B-vs-A plot."""

from __future__ import annotations

import statistics

SUMMARIZED = ("b_test", "b_unseen_symbols", "b_longer", "a_mean", "a_facts", "output_change_a", "output_change_b",
              "train_seconds", "selection_seconds", "peak_bytes")


def summarize(runs: list[dict], method: str) -> dict:
    """Mean and sample standard deviation over the seeds of ``method``'s runs at its chosen learning rate."""
    mine = [run for run in runs if run["method"] == method]
    summary = {"lr": mine[0]["lr"], "trainable": mine[0]["trainable"], "seeds": len(mine)}
    for key in SUMMARIZED:
        values = [run[key] for run in mine]
        summary[key] = statistics.mean(values)
        summary[key + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return summary


def _spread(summary: dict, key: str) -> str:
    return f"{summary[key]:.1%} ± {summary[key + '_std']:.1%}"


def table(summaries: dict, bases: list) -> str:
    base = {key: statistics.mean(scores[key] for scores in bases) for key in bases[0]}
    rows = [
        "| method | trainable params | lr | B test | B unseen symbols | B longer | A after | A facts after | train s "
        "| peak MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        f"| base models (before fine-tuning) | 0 | - | {base['b_test']:.1%} | {base['b_unseen_symbols']:.1%} | "
        f"{base['b_longer']:.1%} | {base['a_mean']:.1%} | {base['a_facts']:.1%} | - | - |",
    ]
    for method, s in summaries.items():
        scores = " | ".join(_spread(s, key) for key in ("b_test", "b_unseen_symbols", "b_longer", "a_mean", "a_facts"))
        rows.append(f"| {method} | {s['trainable']:,} | {s['lr']:g} | {scores} | {s['train_seconds']:.1f} | "
                    f"{s['peak_bytes'] / 2**20:.1f} |")
    return "\n".join(rows)


def diagnostics(summaries: dict) -> str:
    rows = ["| method | output change on A inputs | on B inputs | B / A |", "|---|---:|---:|---:|"]
    for method, s in summaries.items():
        rows.append(f"| {method} | {s['output_change_a']:.3f} | {s['output_change_b']:.3f} | "
                    f"{s['output_change_b'] / s['output_change_a']:.2f} |")
    return "\n".join(rows)


def plot(results: dict, path: str) -> None:
    """B test accuracy against A accuracy after fine-tuning: each method's chosen learning rate (mean ± std over
    seeds) as a marker, its seed-0 learning-rate sweep as a thin line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(11, 7))
    colors = plt.get_cmap("tab20").colors
    for index, (method, s) in enumerate(results["summaries"].items()):
        color = colors[index % len(colors)]
        sweep = sorted((run for run in results["sweep"] if run["method"] == method), key=lambda run: run["lr"])
        axis.plot([run["a_mean"] for run in sweep], [run["b_test"] for run in sweep], "-", color=color, alpha=0.35,
                  linewidth=1)
        axis.errorbar(s["a_mean"], s["b_test"], xerr=s["a_mean_std"], yerr=s["b_test_std"], capsize=3, color=color,
                      fmt="o" if method.startswith("s2ft") else "s", markersize=7, label=f"{method} (lr {s['lr']:g})")
    base_a = statistics.mean(scores["a_mean"] for scores in results["bases"])
    axis.axvline(base_a, color="grey", linestyle=":", label="base models' A accuracy")
    axis.set_xlabel("A accuracy after fine-tuning on B (retention; A is not replayed)")
    axis.set_ylabel("B accuracy, test")
    axis.set_title("Fine-tuning on B at equal trainable parameters\nmarkers: chosen lr, mean ± std over seeds; "
                   "lines: the 3-point lr sweep (seed 0)", fontsize=10)
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
