"""The real-model quality benchmark's reading: each method's curve of new-task accuracy against retention, compared at
equal new-task accuracy (mean ± sd over seeds); markdown tables and the plot.

    python benchmarks/quality_real_report.py [benchmarks/quality_real.json]   # print the tables, redraw the plot

A run's trajectory is the base (step 0) followed by its checkpoints. At an accuracy level, a run's retention is read
where its trajectory first reaches that new-task test accuracy, linearly between the checkpoints around it; a method's
value for a seed is the best over its learning rates (each method gets the same choice), and a seed whose runs never
reach the level does not count (the tables say how many did).
"""

from __future__ import annotations

import json
import os
import statistics
import sys

LEVELS = (0.3, 0.5, 0.7, 0.8)
# metric -> the better of two values
BETTER = {"questions_kept": max, "drift": min, "out_of_distribution": max}
ACCURACY = "new_test"


def trajectory(run: dict, base: dict) -> list[dict]:
    return [dict(step=0, **base)] + run["points"]


def at_accuracy(run: dict, base: dict, metric: str, level: float):
    """``metric`` where ``run`` first reaches new-task accuracy ``level``, interpolated; None if it never does."""
    points = trajectory(run, base)
    if points[0][ACCURACY] >= level:
        return points[0][metric]
    for before, after in zip(points, points[1:]):
        if after[ACCURACY] >= level:
            weight = (level - before[ACCURACY]) / (after[ACCURACY] - before[ACCURACY])
            return before[metric] + weight * (after[metric] - before[metric])
    return None


def by_method_seed(results: dict) -> dict:
    """method -> seed -> its runs, methods in the setup's order."""
    groups = {method: {} for method in results["setup"]["methods"]}
    for run in results["runs"]:
        groups[run["method"]].setdefault(run["seed"], []).append(run)
    return {method: seeds for method, seeds in groups.items() if seeds}


def best_at(runs: list[dict], base: dict, metric: str, level: float):
    """The best value of ``metric`` at ``level`` over the learning rates of one method and seed (None: none reach)."""
    values = [v for v in (at_accuracy(run, base, metric, level) for run in runs) if v is not None]
    return BETTER[metric](values) if values else None


def spread(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def curves(results: dict, levels) -> dict:
    """method -> metric -> level -> (mean, sd, seeds reaching), None where no seed reaches the level."""
    out = {}
    for method, seeds in by_method_seed(results).items():
        out[method] = {}
        for metric in BETTER:
            out[method][metric] = {}
            for level in levels:
                values = [v for v in (best_at(runs, results["base"], metric, level) for runs in seeds.values())
                          if v is not None]
                out[method][metric][level] = (*spread(values), len(values)) if values else None
    return out


def practitioner_choice(runs: list[dict]) -> dict:
    """The point a user tuning on the new task's validation split would ship: the best validation accuracy over
    learning rates and checkpoints; ties go to the lower learning rate, then the earlier step."""
    candidates = [(point, run) for run in runs for point in run["points"]]
    point, run = max(candidates, key=lambda c: (c[0]["new_validation"], -c[1]["lr"], -c[0]["step"]))
    return dict(point, lr=run["lr"])


CHOICE_COLUMNS = ("new_test", "rule_test", "code_test", "rule_longer", "code_reworded", "questions_kept",
                  "drift")


def _cell(mean: float, sd: float, signed: bool = False, percent: bool = True) -> str:
    if percent:
        return f"{mean:.0%} ± {sd:.0%}"
    return f"{mean:+.2f} ± {sd:.2f}" if signed else f"{mean:.2f} ± {sd:.2f}"


def _metric_cell(metric: str, mean: float, sd: float) -> str:
    return _cell(mean, sd, signed=True, percent=False) if metric == "drift" else _cell(mean, sd)


def parameters_table(results: dict) -> str:
    counts = {method: seeds[min(seeds)][0]["trainable"] for method, seeds in by_method_seed(results).items()}
    reference = counts.get("s2ft_random")
    rows = ["| method | trainable parameters | vs S2FT default |", "|---|---:|---:|"]
    for method, count in counts.items():
        ratio = f"{count / reference:.3f}x" if reference else "-"
        rows.append(f"| {method} | {count:,} | {ratio} |")
    return "\n".join(rows)


def equal_accuracy_table(results: dict, metric: str, levels=LEVELS) -> str:
    """``metric`` at equal new-task test accuracy: a row per method, a column per accuracy level."""
    table = curves(results, levels)
    seeds = results["setup"]["seeds"]
    rows = ["| method | " + " | ".join(f"at {level:.0%}" for level in levels) + " |", "|---|" + "---:|" * len(levels)]
    for method, metrics in table.items():
        cells = []
        for level in levels:
            value = metrics[metric][level]
            if value is None:
                cells.append("not reached")
            else:
                mean, sd, reached = value
                cells.append(_metric_cell(metric, mean, sd) + ("" if reached == seeds else f" ({reached}/{seeds} seeds)"))
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def choice_table(results: dict) -> str:
    """Per method, the validation-chosen point over seeds (mean ± sd), with the learning rates and steps chosen."""
    rows = ["| method | lr chosen (per seed) | step | new-task test | rule | code | rule, longer (OOD) | "
            "code, reworded (OOD) | questions kept | drift (nats/token) | train CPU s/step |",
            "|---|---|---|" + "---:|" * 8]
    base = results["base"]
    rows.append("| base model | - | - | " + " | ".join(
        f"{base[c]:.0%}" for c in CHOICE_COLUMNS[:5]) + f" | 100% ({results['questions_right']} of "
        f"{results['questions_asked']}) | 0 | - |")
    for method, seeds in by_method_seed(results).items():
        chosen = [practitioner_choice(runs) for runs in seeds.values()]
        cells = [_metric_cell(c, *spread([p[c] for p in chosen])) for c in CHOICE_COLUMNS]
        runs = [run for runs in seeds.values() for run in runs]
        per_step = statistics.mean(run["train_cpu_seconds"] for run in runs) / results["setup"]["steps"]
        lrs = ", ".join(f"{p['lr']:g}" for p in chosen)
        steps = ", ".join(str(p["step"]) for p in chosen)
        rows.append(f"| {method} | {lrs} | {steps} | " + " | ".join(cells) + f" | {per_step:.2f} |")
    return "\n".join(rows)


def learning_rate_table(results: dict) -> str:
    """Every learning rate at every checkpoint, mean over seeds: new-task test, questions kept, drift."""
    rows = ["| method | lr | " + " | ".join(f"step {s}: new / kept / drift" for s in results["setup"]["checkpoints"])
            + " |", "|---|---:|" + "---|" * len(results["setup"]["checkpoints"])]
    for method, seeds in by_method_seed(results).items():
        for lr in sorted({run["lr"] for runs in seeds.values() for run in runs}):
            runs = [run for runs in seeds.values() for run in runs if run["lr"] == lr]
            cells = []
            for index in range(len(results["setup"]["checkpoints"])):
                points = [run["points"][index] for run in runs]
                cells.append(" / ".join(
                    f"{statistics.mean(p[m] for p in points):{fmt}}"
                    for m, fmt in ((ACCURACY, ".0%"), ("questions_kept", ".0%"), ("drift", "+.2f"))))
            rows.append(f"| {method} | {lr:g} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def text(results: dict) -> str:
    return "\n\n".join([
        f"{len(results['runs'])} runs; {results['machine']}",
        "Trainable parameters:\n" + parameters_table(results),
        *(f"{title} at equal new-task test accuracy (best learning rate per seed, read along each run):\n"
          + equal_accuracy_table(results, metric) for metric, title in (
              ("questions_kept", "General questions kept"), ("drift", "Drift (nats/token)"),
              ("out_of_distribution", "Out-of-distribution accuracy"))),
        "Chosen on the new tasks' validation split (over learning rates and checkpoints):\n" + choice_table(results),
        "Every learning rate and checkpoint (mean over seeds):\n" + learning_rate_table(results),
    ])


def plot(results: dict, path: str) -> None:
    """New-task accuracy against questions kept and against drift: every checkpoint of every run as a faint dot, and
    each method's curve at equal accuracy (mean over the seeds that reach a level, ± sd shaded)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = [round(0.05 * i, 2) for i in range(1, 21)]
    table = curves(results, levels)
    figure, axes = plt.subplots(1, 2, figsize=(16, 6))
    colors = plt.get_cmap("tab10").colors
    for index, method in enumerate(table):
        color = colors[index % len(colors)]
        style = "-" if method.startswith("s2ft") else "--"
        for axis, metric in zip(axes, ("questions_kept", "drift")):
            points = [p for run in results["runs"] if run["method"] == method for p in run["points"]]
            axis.scatter([p[ACCURACY] for p in points], [p[metric] for p in points], s=9, color=color, alpha=0.3,
                         label=f"{method}, every checkpoint")
            reached = [(level, value) for level, value in table[method][metric].items()
                       if value is not None and value[2] == results["setup"]["seeds"]]
            if reached:
                xs = [level for level, _ in reached]
                means = [value[0] for _, value in reached]
                sds = [value[1] for _, value in reached]
                axis.plot(xs, means, style, color=color, linewidth=2, label=f"{method}, at equal accuracy")
                axis.fill_between(xs, [m - s for m, s in zip(means, sds)], [m + s for m, s in zip(means, sds)],
                                  color=color, alpha=0.12)
    base = results["base"][ACCURACY]
    axes[0].scatter([base], [1.0], marker="*", s=150, color="black", label="base model", zorder=5)
    axes[1].scatter([base], [0.0], marker="*", s=150, color="black", zorder=5)
    axes[0].set_ylabel(f"general questions still right (of the {results['questions_right']} the base gets right)")
    axes[1].set_ylabel("drift: NLL of the base's own answers, change (nats/token; axis cut at 6)")
    axes[1].set_ylim(-0.2, 6)
    for axis in axes:
        axis.set_xlabel("new-task accuracy (test, mean of the two skills)")
        axis.set_xlim(-0.02, 1.02)
        axis.grid(alpha=0.3)
    axes[1].legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    setup = results["setup"]
    figure.suptitle(f"SmolLM2-135M-Instruct at equal trainable parameters: lines, the best learning rate at each "
                    f"accuracy (mean ± sd over the {setup['seeds']} seeds, where all reach it); dots, every "
                    f"checkpoint (steps {', '.join(map(str, setup['checkpoints']))})", fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def main():
    path = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                                               "quality_real.json")
    with open(path) as handle:
        results = json.load(handle)
    print(text(results))
    plot(results, os.path.splitext(path)[0] + ".png")


if __name__ == "__main__":
    main()
