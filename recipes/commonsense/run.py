"""Fine-tune on commonsense-170k with TRL's SFTTrainer and S2FT, then score the eight commonsense benchmarks.

    python -m recipes.commonsense.run --config recipes/commonsense/llama3_8b.yaml --data_dir /path/to/LLM-Adapters

Every YAML key is a flag of CommonsenseArguments, SFTConfig, ModelConfig or S2FTArguments; flags override the YAML.
The adapter is saved to ``output_dir``; accuracies go to ``output_dir/commonsense_results.json`` and are printed beside
the numbers reported for the same base model (``reported_results.json``). Evaluation runs on the main process.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Optional

from datasets import Dataset
from trl import ModelConfig, SFTConfig, SFTTrainer, TrlParser

from s2ft_plugin.script_args import S2FTArguments, select_from_training_data

from . import tasks

HERE = os.path.dirname(os.path.abspath(__file__))
REPORTED = os.path.join(HERE, "reported_results.json")
RESULTS_NAME = "commonsense_results.json"


@dataclass
class CommonsenseArguments:
    data_dir: str = field(metadata={"help": "LLM-Adapters checkout: ft-training_set/ and dataset/<task>/test.json."})
    eval_tasks: list[str] = field(default_factory=lambda: list(tasks.TASK_LABELS),
                                  metadata={"help": "Benchmarks to score after training."})
    val_set_size: int = field(default=120, metadata={"help": "Training examples held out for the eval loss."})
    eval_batch_size: int = field(default=16, metadata={"help": "Prompts generated together."})
    eval_max_new_tokens: int = field(default=32, metadata={"help": "Tokens generated per answer."})
    eval_num_beams: int = field(default=4, metadata={"help": "Beam search width (1: greedy)."})
    eval_limit: Optional[int] = field(default=None, metadata={"help": "Score only the first N examples per task."})


def make_parser() -> TrlParser:
    return TrlParser((CommonsenseArguments, SFTConfig, ModelConfig, S2FTArguments))


def evaluate_all(model, tokenizer, args: CommonsenseArguments, output_dir: str) -> dict[str, float]:
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    accuracies = {}
    os.makedirs(os.path.join(output_dir, "predictions"), exist_ok=True)
    for task in args.eval_tasks:
        path = os.path.join(args.data_dir, "dataset", task, "test.json")
        examples = tasks.read_examples(path, ("instruction", "answer"), args.eval_limit)
        accuracies[task], predicted = tasks.evaluate(model, tokenizer, task, examples, args.eval_batch_size,
                                                     args.eval_max_new_tokens, args.eval_num_beams)
        with open(os.path.join(output_dir, "predictions", f"{task}.jsonl"), "w") as handle:
            for example, label in zip(examples, predicted):
                handle.write(json.dumps({"answer": example["answer"], "predicted": label}) + "\n")
        print(f"{task}: {accuracies[task]:.4f} ({len(examples)} examples)")
    return accuracies


def comparison_table(model_id: str, accuracies: dict[str, float]) -> str:
    """Our accuracies (in %) beside the rows reported for ``model_id``, over the tasks we scored."""
    with open(REPORTED) as handle:
        reported = json.load(handle)["models"].get(model_id, {})
    columns = list(accuracies)
    rows = [("this run", {task: 100 * value for task, value in accuracies.items()})]
    rows += [(name, row["accuracy"]) for name, row in reported.items()]
    lines = ["| method | " + " | ".join(columns) + " | average |", "|" + "---|" * (len(columns) + 2)]
    for name, values in rows:
        cells = [f"{values[t]:.1f}" if values.get(t) is not None else "n/a" for t in columns]
        scored = [values[t] for t in columns if values.get(t) is not None]
        average = f"{sum(scored) / len(scored):.1f}" if len(scored) == len(columns) else "n/a"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {average} |")
    return "\n".join(lines)


def main(argv=None):
    args, training_args, model_args, s2ft_args = make_parser().parse_args_and_config(args=argv)
    unknown = set(args.eval_tasks) - set(tasks.TASK_LABELS)
    if unknown:
        raise ValueError(f"Unknown eval_tasks {sorted(unknown)}; choose from {sorted(tasks.TASK_LABELS)}.")
    dataset = Dataset.from_dict(tasks.training_rows(os.path.join(args.data_dir, tasks.TRAIN_FILE)))
    splits = (dataset.train_test_split(test_size=args.val_set_size, seed=training_args.seed) if args.val_set_size
              else {"train": dataset, "test": None})
    training_args.model_init_kwargs = dict(dtype=model_args.dtype, **(training_args.model_init_kwargs or {}))
    trainer = SFTTrainer(model=model_args.model_name_or_path, args=training_args, train_dataset=splits["train"],
                         eval_dataset=splits["test"], peft_config=s2ft_args.to_config())
    s2ft_args.cast_deltas(trainer.model)
    if s2ft_args.s2ft_selection != "random":
        select_from_training_data(trainer, s2ft_args.s2ft_calibration_batches)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    if not trainer.accelerator.is_main_process:
        return trainer, None
    accuracies = evaluate_all(trainer.model, trainer.processing_class, args, training_args.output_dir)
    results = {
        "model": model_args.model_name_or_path, "adapter": training_args.output_dir,
        "s2ft_config": json.loads(json.dumps(trainer.model.peft_config["default"].to_dict(), default=sorted)),
        "accuracy": accuracies, "average": sum(accuracies.values()) / len(accuracies),
        "generation": {"num_beams": args.eval_num_beams, "max_new_tokens": args.eval_max_new_tokens},
        "train_loss": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
    }
    with open(os.path.join(training_args.output_dir, RESULTS_NAME), "w") as handle:
        json.dump(results, handle, indent=2)
    print(comparison_table(model_args.model_name_or_path, accuracies))
    return trainer, results


if __name__ == "__main__":
    main()
