#!/usr/bin/env python
"""Fine-tune a CLIP-style model with MMFT (w * SupCon + (1 - w) * CLIP on image/caption pairs).

With no `--model_name_or_path` and no `--dataset_name` it runs an embedded offline demo: a synthetic captioned
dataset of drawn shapes and a small CLIP built from a config. The demo shows the mechanics, not CLIP's accuracy.

Real run (GPU, any captioned dataset with image / label / captions columns); `mmft-hf finetune ...` for one
process, `accelerate launch -m mmft_hf.cli finetune ...` (or `accelerate launch examples/finetune.py ...`) for one
process per GPU:

    accelerate launch -m mmft_hf.cli finetune \\
        --model_name_or_path openai/clip-vit-base-patch32 \\
        --dataset_name mmft/captioned-dtd --num_shots 16 --seed 1 \\
        --supcon_weight 0.1 --fp16 true --output_dir outputs/dtd-16shot

All `transformers.TrainingArguments` flags work; MMFT's own are in `MMFTTrainingArguments`.
"""

import copy
import json
import logging
import os
import sys
from dataclasses import dataclass, field

import datasets
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from transformers import AutoModel, AutoProcessor, set_seed

from mmft_hf import MMFTTrainer, MMFTTrainingArguments
from mmft_hf.commands.flags import command_parser, errors_in_flags, flag_names
from mmft_hf.commands.launch import log_launch, process_group_teardown
from mmft_hf.evaluation import load_benchmark_splits
from mmft_hf.evaluation.retention import RetentionArguments, RetentionSet, retention_set_from_flags
from mmft_hf.evaluation.wise_ft_curve import WISE_FT_PLOT_FILENAME, WiseFTSweep, best_alpha, plot_wise_ft_curve
from mmft_hf.synthetic import DEMO_TRAINING_ARGUMENTS, build_demo_clip, make_synthetic_dataset
from mmft_hf.training.arguments import resolve_resume_checkpoint
from mmft_hf.training.wise_ft import parse_alphas

logger = logging.getLogger("finetune")

# Used when neither a model nor a dataset is given: a small random CLIP learns the synthetic shapes within a couple
# of minutes on 2 CPU cores. Flags on the command line still win.
DEMO_ARGUMENTS = [*DEMO_TRAINING_ARGUMENTS, "--num_train_epochs", "30"]
SUGGESTED_MODEL = "openai/clip-vit-base-patch32"  # named by the error for a dataset without a model
RESULTS_FILENAME = "all_results.json"  # written last: its presence marks a finished run


@dataclass
class ModelArguments:
    _argument_group_name = "model"  # a heading in --help (`HfArgumentParser`)

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub id or local directory of a CLIP-style model (e.g. openai/clip-vit-base-patch32). "
                  "Omit it (and --dataset_name) for the offline demo."},
    )  # fmt: skip
    cache_dir: str | None = field(default=None, metadata={"help": "Where downloaded models and datasets are kept."})
    wise_ft_alpha: str | None = field(
        default=None,
        metadata={"help": "WiSE-FT: save (1 - A) * start + A * fine-tuned weights instead of the fine-tuned ones "
                  "(prototypes re-encoded). Several values, e.g. '0,0.25,0.5,0.75,1': each is evaluated, the best "
                  "on validation is saved and the curve is recorded (all_results.json, model card, plot)."},
    )  # fmt: skip

    def __post_init__(self):
        if self.wise_ft_alpha is not None:
            parse_alphas(self.wise_ft_alpha)  # a typo fails before any work


@dataclass
class DataArguments:
    _argument_group_name = "data"

    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub id or local directory readable by datasets.load_dataset."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Dataset configuration name."})
    train_split: str = field(default="train", metadata={"help": "Split with the captioned training images."})
    validation_split: str | None = field(
        default=None,
        metadata={"help": "Validation split; a split named here must exist. Default: 'validation' where the dataset "
                  "has it, else a seeded --validation_fraction of train."},
    )  # fmt: skip
    test_split: str | None = field(
        default=None,
        metadata={"help": "Split evaluated at the end; a split named here must exist. Default: 'test' where the "
                  "dataset has it, else the validation split."},
    )  # fmt: skip
    validation_fraction: float = field(default=0.1, metadata={"help": "Held-out share of train when no val split."})
    num_shots: int | None = field(default=None, metadata={"help": "Images per class kept for training (k-shot)."})
    demo_num_classes: int = field(default=8, metadata={"help": "Classes of the synthetic demo dataset."})
    demo_train_per_class: int = field(default=64, metadata={"help": "Training images per class in the demo."})

    def __post_init__(self):
        if self.num_shots is not None and self.num_shots < 1:
            raise ValueError(
                f"--num_shots {self.num_shots}: give at least 1 image per class, or omit --num_shots to train on every "
                "image. (Zero-shot classification trains nothing: `mmft-hf benchmark --methods zeroshot`.)"
            )


# the flags, by --help section; `--retention_*` are declared once for finetune and benchmark
ARGUMENT_DATACLASSES = (ModelArguments, DataArguments, RetentionArguments, MMFTTrainingArguments)


def load_splits(data_args: DataArguments, training_args: MMFTTrainingArguments, cache_dir: str | None):
    """Train / validation / optional test by the benchmark's protocol (`mmft_hf.evaluation.load_benchmark_splits`):
    the official validation split or a seeded, class-stratified hold-out of train, then k-shot sampling of train.

    Returns:
        `(datasets.DatasetDict, protocol)`: `protocol` says where the validation split came from.
    """
    if data_args.dataset_name is None:
        raw = make_synthetic_dataset(
            num_classes=data_args.demo_num_classes, train_per_class=data_args.demo_train_per_class, seed=0
        )
    else:
        raw = datasets.load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir)
    test_split = data_args.test_split or ("test" if "test" in raw else None)
    return load_benchmark_splits(
        raw,
        shots=data_args.num_shots,
        seed=training_args.seed,
        train_split=data_args.train_split,
        validation_split=data_args.validation_split,
        test_split=test_split,
        validation_fraction=data_args.validation_fraction,
        label_column=training_args.label_column,
    )


def load_model(model_args: ModelArguments, train_dataset: datasets.Dataset):
    if model_args.model_name_or_path is None:
        return build_demo_clip(train_dataset)
    model = AutoModel.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
    processor = AutoProcessor.from_pretrained(model_args.model_name_or_path, cache_dir=model_args.cache_dir)
    return model, processor


def wise_ft_and_retention(
    trainer: MMFTTrainer,
    start_model,
    alphas: list[float] | None,
    splits: datasets.DatasetDict,
    retention: RetentionSet | None,
) -> dict:
    """After training: WiSE-FT (each alpha evaluated on validation, and test where there is one; the best on
    validation is loaded into the trainer) and the zero-shot retention of the model to be saved."""
    results = {}
    if alphas:
        sweep = WiseFTSweep(trainer, start_model)
        curve_splits = {name: splits[name] for name in ("validation", "test") if name in splits}
        curve = sweep.curve(alphas, curve_splits, retention)
        alpha = best_alpha(curve)
        sweep.apply(alpha)
        results.update(wise_ft_alpha=alpha, wise_ft_curve=curve)
        if retention is not None:
            results["retention_accuracy_after"] = next(p for p in curve if p["alpha"] == alpha)["retention_accuracy"]
    elif retention is not None:
        results["retention_accuracy_after"] = retention.accuracy(
            trainer.model, trainer.processing_class, trainer.args.per_device_eval_batch_size
        )
    return results


def parse_arguments(
    argv: list[str],
) -> tuple[ModelArguments, DataArguments, RetentionArguments, MMFTTrainingArguments, bool]:
    """Parses the flags (or one JSON file of them); the demo's defaults apply when neither a model nor a dataset
    is given. A dataset without a model is an error: the demo's small random CLIP is not for real data.

    Returns:
        `(model_args, data_args, retention_args, training_args, demo)`.
    """
    parser = command_parser(ARGUMENT_DATACLASSES, __doc__)
    from_json = len(argv) == 1 and argv[0].endswith(".json")
    if from_json:
        model_args, data_args, retention_args, training_args = parser.parse_json_file(os.path.abspath(argv[0]))
    else:
        model_args, data_args, retention_args, training_args = parser.parse_args_into_dataclasses(argv)
    demo = model_args.model_name_or_path is None and data_args.dataset_name is None
    if demo and not from_json:
        model_args, data_args, retention_args, training_args = parser.parse_args_into_dataclasses(
            DEMO_ARGUMENTS + argv
        )
    if data_args.dataset_name is not None and model_args.model_name_or_path is None:
        raise ValueError(
            f"--model_name_or_path is missing: name the model to fine-tune on --dataset_name "
            f"{data_args.dataset_name}, e.g. --model_name_or_path {SUGGESTED_MODEL}. (The offline demo's small random "
            "CLIP runs only when neither --model_name_or_path nor --dataset_name is given.)"
        )
    return model_args, data_args, retention_args, training_args, demo


def summary_line(results: dict, num_classes: int, output_dir: str) -> str:
    """One line: the final split's accuracy after fine-tuning (and before, when it was measured)."""
    final_split = "test" if "test_accuracy" in results["after"] else "validation"
    summary = f"{final_split} accuracy after fine-tuning: {results['after'][f'{final_split}_accuracy']:.1%}"
    before = results.get("before", {}).get(f"{final_split}_before_accuracy")
    if before is not None:
        summary = f"{final_split} accuracy before fine-tuning: {before:.1%} | " + summary
    if "wise_ft_alpha" in results:
        summary += f" (WiSE-FT alpha {results['wise_ft_alpha']:g})"
    if "retention_accuracy_after" in results:
        summary += (f" | zero-shot accuracy on {results['retention_dataset']}: {results['retention_accuracy_before']:.1%}"
                    f" before, {results['retention_accuracy_after']:.1%} after")  # fmt: skip
    return summary + f" ({num_classes} classes; saved to {output_dir})"


def finished_run(args: MMFTTrainingArguments) -> str | None:
    """What `args.output_dir` holds when a run finished there (its final model and `all_results.json`, written
    last), unless `--overwrite_output_dir` or `--resume_from_checkpoint` asks for training; `None` otherwise.
    Decided by the main process and shared with the others, so that every process stops or trains."""
    decision = [None]
    if PartialState().is_main_process:
        results_path = os.path.join(args.output_dir, RESULTS_FILENAME)
        config_path = os.path.join(args.output_dir, "config.json")
        # read as `resolve_resume_checkpoint` reads it: "False", "none", ... ask for no checkpoint
        resume = str(args.resume_from_checkpoint).lower() not in ("none", "false", "no", "")
        requested = args.overwrite_output_dir or resume
        if not requested and os.path.isfile(results_path) and os.path.isfile(config_path):
            with open(results_path, encoding="utf-8") as handle, open(config_path, encoding="utf-8") as config:
                results, num_classes = json.load(handle), len(json.load(config).get("id2label", {}))
            summary = summary_line(results, num_classes, args.output_dir) if "after" in results else "no accuracy"
            decision[0] = (
                f"{args.output_dir} is already trained, nothing to do ({summary}). To train again: "
                "--overwrite_output_dir true (or another --output_dir)."
            )
    broadcast_object_list(decision, from_process=0)
    return decision[0]


def main(argv: list[str] | None = None) -> dict:
    """Runs the command with `argv` (default: `sys.argv[1:]`); returns the before/after metrics. Under a launcher
    the process group is destroyed at the end, whether the run succeeded or not. A `ValueError` names the
    command's flags (`--supcon_weight`), not Python keywords."""
    with process_group_teardown(), errors_in_flags(flag_names(ARGUMENT_DATACLASSES)):
        return run(sys.argv[1:] if argv is None else argv)


def run(argv: list[str]) -> dict:
    model_args, data_args, retention_args, training_args, demo = parse_arguments(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    log_launch(training_args, logger)
    finished = finished_run(training_args)
    if finished is not None:
        if training_args.process_index == 0:
            print(finished)
        return {}
    checkpoint = resolve_resume_checkpoint(training_args)  # before any work: a non-empty output_dir fails fast
    stale_results = os.path.join(training_args.output_dir, RESULTS_FILENAME)
    if training_args.process_index == 0 and os.path.isfile(stale_results):
        os.remove(stale_results)  # an earlier run's: left there, it would mark this run finished if it stops early
    if demo:
        logger.info("No model or dataset given: running the offline demo (synthetic shapes, small CLIP).")
    set_seed(training_args.seed)
    splits, protocol = load_splits(data_args, training_args, model_args.cache_dir)
    logger.info(f"Splits: {', '.join(f'{name} {len(split)} rows' for name, split in splits.items())} ({protocol}).")
    model, processor = load_model(model_args, splits["train"])
    alphas = parse_alphas(model_args.wise_ft_alpha) if model_args.wise_ft_alpha is not None else None
    start_model = copy.deepcopy(model) if alphas else None  # the trainer may wrap `model` with LoRA in place
    retention = retention_set_from_flags(retention_args, training_args, model_args.cache_dir)
    results = {}
    if retention is not None:
        results.update(retention_dataset=retention.name, retention_split=retention_args.retention_split)
        results["retention_accuracy_before"] = retention.accuracy(
            model.to(training_args.device), processor, training_args.per_device_eval_batch_size
        )
    trainer = MMFTTrainer(
        model=model,
        args=training_args,
        train_dataset=splits["train"],
        eval_dataset=splits["validation"],
        processing_class=processor,
    )
    final_split = "test" if "test" in splits else "validation"
    if training_args.do_eval or demo:
        results["before"] = trainer.evaluate(splits[final_split], metric_key_prefix=f"{final_split}_before")
    trainer.train(resume_from_checkpoint=checkpoint)
    results.update(wise_ft_and_retention(trainer, start_model, alphas, splits, retention))
    trainer.save_model()
    results["after"] = trainer.evaluate(splits[final_split], metric_key_prefix=final_split)
    if trainer.is_world_process_zero():
        card = {key: results[key] for key in (
            "wise_ft_alpha", "wise_ft_curve", "retention_dataset", "retention_accuracy_before", "retention_accuracy_after"
        ) if key in results}  # fmt: skip
        if len(alphas or ()) > 1:
            path = os.path.join(training_args.output_dir, WISE_FT_PLOT_FILENAME)
            if plot_wise_ft_curve(results["wise_ft_curve"], path, results.get("retention_dataset")):
                card["wise_ft_plot"] = WISE_FT_PLOT_FILENAME
        # the card written by save_model() had the validation accuracy; now it gets the final split's
        trainer.create_model_card(dataset=data_args.dataset_name, num_shots=data_args.num_shots, **card)
        with open(os.path.join(training_args.output_dir, RESULTS_FILENAME), "w") as handle:
            json.dump(results, handle, indent=2)
        print(summary_line(results, len(trainer.class_names), training_args.output_dir))
    return results


if __name__ == "__main__":
    main()
