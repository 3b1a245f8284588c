"""`hpt-trl train`: train with HPT from a recipe, like `trl grpo`.

    hpt-trl train --config recipes/tiny_cpu.yaml [--key value ...]
    accelerate launch --config_file examples/accelerate_configs/zero3.yaml -m hpt_trl.cli train --config recipes/NAME.yaml

The command line is parsed by TRL's `TrlParser` into three dataclasses, as `trl grpo` does: [`HPTScriptArguments`]
(data and rewards), [`~hpt_trl.HPTConfig`] (every `GRPOConfig` option plus the HPT ones) and [`~trl.ModelConfig`]
(model and LoRA). A `--config` YAML file sets the defaults; any option given on the command line overrides it.

Datasets (`dataset_name`): a name of `hpt_trl.data.DATASETS` (`toy`, the built-in toy arithmetic task, `gsm8k`, `math`,
`math500`, `openr1_math_46k`, the paper's training set, alias `openr1`), a local `.jsonl`/`.json`/`.parquet`/`.csv` file
or `save_to_disk` folder, or any Hub dataset id with the columns `prompt`, `completion` (the demonstration) and
`solution`. `data_files` reads a local file instead, and a `datasets:` list mixes several as in `trl grpo` (TRL's
`DatasetMixtureConfig`). Columns that a known schema does not read are kept: they reach the reward functions. Model: any
`model_name_or_path`, or `tiny` to build the tiny local Llama of `hpt_trl.tiny` (offline, for CPU).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from dataclasses import dataclass, field

from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from .hpt_config import HPTConfig

logger = logging.getLogger(__name__)

TINY_MODEL = "tiny"
TINY_MODEL_FOLDER = "tiny-init"  # where `model_name_or_path: tiny` is built, inside output_dir
# Old reward names that still work, with a warning: `accuracy_reward` was `math_accuracy_reward`, which shadowed TRL's
DEPRECATED_REWARD_NAMES = {"accuracy_reward": "math_accuracy_reward"}


@dataclass
class HPTScriptArguments(ScriptArguments, DatasetMixtureConfig):
    """
    Script arguments of `hpt-trl train` (the data and reward options; training options are in [`HPTConfig`], model
    options in [`~trl.ModelConfig`]). The dataset mixture options of `trl grpo` (`datasets`, `streaming`,
    `test_split_size`, from [`~trl.DatasetMixtureConfig`]) are here too.

    Args:
        dataset_name (`str`, *optional*):
            `toy`, `gsm8k`, `math`, `math500`, `openr1_math_46k` (alias `openr1`), a local file or folder, or a Hub
            dataset id whose rows have `prompt`, `completion` (demonstration) and `solution` columns.
        data_files (`str`, *optional*):
            A local `.jsonl`, `.json`, `.parquet` or `.csv` file (or `save_to_disk` folder) to train on, instead of
            `dataset_name`. Rows in the HPT schema are used as they are; GSM8K, MATH and OpenR1 schemas are mapped.
        datasets (`list[DatasetConfig]`, *optional*):
            A mixture of datasets, as in `trl grpo` (a YAML list of `path`, `data_files`, `split`, `columns`,
            `fraction`, ...); it replaces `dataset_name`. Each row is mapped like a `data_files` row.
        dataset_limit (`int`, *optional*):
            Keep only the first `dataset_limit` training rows.
        conversational (`bool`, *optional*, defaults to `False`):
            Build conversational prompts and demonstrations (lists of messages) for the built-in datasets.
        prompt_template (`str`, *optional*):
            Prompt template of the built-in math datasets: `luffy` (the paper's system prompt, used with Qwen), `simple`
            (used with LLaMA) or `none`. Default: the paper's choice for the model family.
        reward_funcs (`list[str]`, *optional*, defaults to `["math_accuracy_reward"]`):
            Reward functions: `math_accuracy_reward` (math-verify, with a deadline: `hpt_trl.rewards`; `accuracy_reward`
            is its deprecated old name), `trl_accuracy_reward` (TRL's `accuracy_reward`), `reasoning_accuracy_reward`,
            `think_format_reward`, `get_soft_overlong_punishment`, `toy_answer_reward` (the toy task's), or a dotted
            import path. Every dataset column reaches them as a keyword argument.
        reward_model_name_or_path (`str`, *optional*):
            A reward model, added before the reward functions.
        merge_adapter (`bool`, *optional*, defaults to `False`):
            With `use_peft`, also save the LoRA adapter merged into the base model in `output_dir/merged`.
    """

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "toy, gsm8k, math, math500, openr1_math_46k (alias openr1), a local file or folder, or a Hub "
            "dataset id with prompt, completion (demonstration) and solution columns."
        },
    )
    data_files: str | None = field(
        default=None,
        metadata={
            "help": "A local .jsonl/.json/.parquet/.csv file or save_to_disk folder to train on (replaces "
            "dataset_name)."
        },
    )
    dataset_limit: int | None = field(default=None, metadata={"help": "Keep only the first N training rows."})
    conversational: bool = field(
        default=False, metadata={"help": "Conversational prompts and demonstrations for the built-in datasets."}
    )
    prompt_template: str | None = field(
        default=None,
        metadata={"help": "luffy, simple or none. Default: the paper's template for the model family."},
    )
    reward_funcs: list[str] | None = field(
        default_factory=lambda: ["math_accuracy_reward"],
        metadata={
            "help": "Reward functions: math_accuracy_reward (hpt_trl.rewards), trl_accuracy_reward, "
            "reasoning_accuracy_reward, think_format_reward, get_soft_overlong_punishment, toy_answer_reward, or a "
            "dotted import path such as 'my_lib.rewards.custom_reward'."
        },
    )
    reward_model_name_or_path: str | None = field(
        default=None, metadata={"help": "A reward model (Hub id or local folder), used before the reward functions."}
    )
    merge_adapter: bool = field(
        default=False,
        metadata={"help": "With use_peft, also save the adapter merged into the base model in output_dir/merged."},
    )


def make_parser(prog: str | None = "hpt-trl train") -> TrlParser:
    description = (
        "Train with HPT. `--config recipes/NAME.yaml` sets the options from a recipe (YAML: option: value, plus an "
        "optional `env:` mapping of environment variables); options given on the command line override it."
    )
    return TrlParser((HPTScriptArguments, HPTConfig, ModelConfig), prog=prog, description=description)


# The options `hpt-trl train --help` lists after the HPT ones (`--help-all` lists every option)
COMMON_OPTIONS = {
    "model": ("model_name_or_path", "dtype", "use_peft", "lora_r", "lora_alpha"),
    "data and rewards": (
        "dataset_name", "data_files", "datasets", "dataset_limit", "conversational", "prompt_template", "reward_funcs",
        "reward_model_name_or_path", "merge_adapter",
    ),
    "training (the most used GRPOConfig options)": (
        "output_dir", "num_generations", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps",
        "num_train_epochs", "learning_rate", "max_completion_length", "temperature", "loss_type", "use_vllm", "bf16",
        "use_cpu", "logging_steps", "save_steps", "resume_from_checkpoint", "report_to", "push_to_hub", "seed",
    ),
}  # fmt: skip


def hpt_option_names() -> list[str]:
    """The options [`HPTConfig`] adds to `GRPOConfig`, in their declaration order."""
    from dataclasses import fields

    from trl import GRPOConfig

    inherited = {f.name for f in fields(GRPOConfig)}
    return [f.name for f in fields(HPTConfig) if f.name not in inherited]


def short_help(parser: TrlParser | None = None) -> str:
    """`hpt-trl train --help`: `--config`, the HPT options, then the most used model, data and training options, with a
    pointer to `--help-all` (every `GRPOConfig`, `TrainingArguments` and `ModelConfig` option)."""
    import argparse

    parser = parser or make_parser()
    actions = {action.dest: action for action in parser._actions}
    short = argparse.ArgumentParser(
        prog=parser.prog,
        usage=f"{parser.prog} [--config RECIPE.yaml] [--option value ...]",
        description=parser.description,
        epilog=f"These are the main options. `{parser.prog} --help-all` lists all {len(parser._actions) - 1}: every "
        "GRPOConfig, TrainingArguments and ModelConfig option is accepted, as in `trl grpo`.",
        add_help=False,
    )
    recipe = short.add_argument_group("recipe")
    recipe.add_argument(
        "--config",
        metavar="RECIPE.yaml",
        help="YAML file of option: value pairs (see recipes/), plus an optional `env:` mapping of environment "
        "variables. Options given on the command line override it.",
    )
    recipe.add_argument("-h", "--help", action="store_true", help="Show this message.")
    recipe.add_argument("--help-all", action="store_true", help="Show every option.")
    groups = {"HPT (HPTConfig; the rest of HPTConfig is GRPOConfig)": hpt_option_names(), **COMMON_OPTIONS}
    for title, names in groups.items():
        group = short.add_argument_group(title)
        for name in names:
            if name in actions:
                group._add_action(actions[name])
    return short.format_help()


def parse_args(argv: list[str] | None = None) -> tuple[HPTScriptArguments, HPTConfig, ModelConfig]:
    """Parse `argv` (a `--config` YAML file and/or options) into the script, training and model arguments."""
    script_args, training_args, model_args = make_parser().parse_args_and_config(args=argv)
    return script_args, training_args, model_args


# Rewards


def _reward_registry() -> dict:
    from trl.rewards import (
        accuracy_reward,
        get_soft_overlong_punishment,
        reasoning_accuracy_reward,
        think_format_reward,
    )

    from .rewards import math_accuracy_reward
    from .toy_task import toy_answer_reward

    return {
        "math_accuracy_reward": math_accuracy_reward,
        "trl_accuracy_reward": accuracy_reward,
        "reasoning_accuracy_reward": reasoning_accuracy_reward,
        "think_format_reward": think_format_reward,
        "get_soft_overlong_punishment": get_soft_overlong_punishment(max_completion_len=1280, soft_punish_cache=256),
        "toy_answer_reward": toy_answer_reward,
    }


def _current_reward_name(name: str) -> str:
    """`name`, or the current name of a deprecated one (with a warning)."""
    if name not in DEPRECATED_REWARD_NAMES:
        return name
    new = DEPRECATED_REWARD_NAMES[name]
    logger.warning(
        "The reward name %r is deprecated: it is hpt_trl's `%s` (not TRL's `accuracy_reward`, which is "
        "`trl_accuracy_reward` here). Write `%s` in `reward_funcs` and `performance_reward`.",
        name,
        new,
        new,
    )
    return new


def upgrade_deprecated_reward_names(script_args: HPTScriptArguments, training_args: HPTConfig) -> None:
    """Replace deprecated names in `reward_funcs` and `performance_reward` by the current ones (with a warning), so
    that old recipes still run."""
    if script_args.reward_funcs:
        script_args.reward_funcs = [_current_reward_name(name) for name in script_args.reward_funcs]
    if training_args.performance_reward in DEPRECATED_REWARD_NAMES:
        training_args.performance_reward = _current_reward_name(training_args.performance_reward)


def load_reward_funcs(script_args: HPTScriptArguments) -> list:
    """The reward models and functions named in `script_args`, as TRL's `grpo` script resolves them."""
    registry = _reward_registry()
    reward_funcs = [script_args.reward_model_name_or_path] if script_args.reward_model_name_or_path else []
    for name in script_args.reward_funcs or []:
        name = _current_reward_name(name)
        if name in registry:
            reward_funcs.append(registry[name])
        elif "." in name:
            module_path, func_name = name.rsplit(".", 1)
            if os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            reward_funcs.append(getattr(importlib.import_module(module_path), func_name))
        else:
            raise ValueError(
                f"Could not load reward function {name!r}. Expected one of {sorted(registry)} or a dotted import path."
            )
    if not reward_funcs:
        raise ValueError("No reward: set `reward_funcs` and/or `reward_model_name_or_path`.")
    return reward_funcs


# Data


def _template(script_args: HPTScriptArguments, model_args: ModelConfig) -> str:
    from .data import template_for_model

    return script_args.prompt_template or template_for_model(model_args.model_name_or_path)


def load_datasets(script_args: HPTScriptArguments, model_args: ModelConfig, need_eval: bool = False):
    """Return `(train_dataset, eval_dataset or None)` with the columns `prompt`, `completion` (when the data has
    demonstrations) and `solution`, plus the columns a known schema does not read."""
    from datasets import IterableDataset, load_dataset
    from trl import get_dataset

    from . import data

    name, limit = script_args.dataset_name, script_args.dataset_limit
    train_split, test_split = script_args.dataset_train_split, script_args.dataset_test_split

    def limited(dataset):
        if limit is None:
            return dataset
        return (
            dataset.take(limit)
            if isinstance(dataset, IterableDataset)
            else dataset.select(range(min(limit, len(dataset))))
        )

    def hpt_schema(dataset):
        if dataset.column_names is None:  # a stream whose columns are unknown until it is read: used as it is
            return dataset
        columns = set(dataset.column_names)
        if {"prompt", "completion", "solution"} <= columns:
            return dataset
        try:
            schema = data.detect_schema(columns)
        except ValueError:
            if "prompt" in columns:  # TRL's convention: `prompt` and whatever the reward functions read
                return dataset
            raise
        return data.to_hpt(
            dataset, schema, conversational=script_args.conversational, template=script_args.prompt_template
        )

    def splits(dataset_dict):
        train = limited(hpt_schema(dataset_dict[train_split]))
        has_test = need_eval and test_split in dataset_dict
        return train, (hpt_schema(dataset_dict[test_split]) if has_test else None)

    if script_args.datasets:  # TRL's mixture, as `trl grpo` loads it
        if name is not None:
            logger.warning("Both `datasets` and `dataset_name` are set: `datasets` is used, `dataset_name` ignored.")
        return splits(get_dataset(script_args))
    if script_args.data_files is not None:
        return limited(hpt_schema(data.read_local(script_args.data_files))), None
    if name is None:
        raise ValueError(
            f"Set `dataset_name` ({', '.join(data.DATASETS)}, a path or a Hub id), `data_files` or `datasets`."
        )
    info = data.dataset_info(name)
    if info is not None:
        kwargs = {"conversational": script_args.conversational, "template": _template(script_args, model_args)}
        train = info.loader(split=train_split, limit=limit, **kwargs)
        if not need_eval or info.held_out is None:
            return train, None
        held_out_name, held_out_split = info.held_out
        return train, data.DATASETS[held_out_name].loader(split=held_out_split, **kwargs)
    if os.path.exists(name):
        return limited(hpt_schema(data.read_local(name))), None
    dataset = load_dataset(name, name=script_args.dataset_config, streaming=script_args.dataset_streaming)
    return splits(dataset)


def describe_data_source(script_args: HPTScriptArguments) -> str:
    """Where the training data comes from, for error messages: the file, the dataset name or the mixture."""
    if script_args.datasets:
        return f"The `datasets` mixture ({', '.join(d.path for d in script_args.datasets)})"
    if script_args.data_files is not None:
        return f"The data file {script_args.data_files!r}"
    return f"The dataset {script_args.dataset_name!r}"


def check_demonstration_column(dataset, training_args: HPTConfig, source: str = "The train dataset") -> None:
    """Stop, before the model loads, when the configuration trains demonstrations and `dataset` has no demonstration
    column; the message names the column and the dataset's columns. `algorithm: grpo` and `gamma < 0` need none."""
    column, columns = training_args.demonstration_column, dataset.column_names
    if not training_args.trains_demonstrations or columns is None or column in columns:
        return
    raise ValueError(
        f"{source} has no demonstration column {column!r}: its columns are {list(columns)}. HPT trains a prompt it "
        f"cannot solve with SFT on its demonstration, so each row needs one: add a {column!r} column (text, or a list "
        "with one assistant message), set `demonstration_column` to the column that holds it, or train without "
        "demonstrations (`algorithm: grpo`, or `gamma` below 0)."
    )


def card_dataset_name(script_args: HPTScriptArguments) -> str | None:
    """The dataset's Hub id for the model card (`None` for local data, mixtures and the toy task)."""
    from .data import dataset_info

    name = script_args.dataset_name
    if script_args.data_files is not None or script_args.datasets or name is None or os.path.exists(name):
        return None
    info = dataset_info(name)
    return name if info is None else info.hub_id


# Model


def require_model_name(model_args: ModelConfig) -> None:
    if model_args.model_name_or_path is None:
        raise ValueError("Set `model_name_or_path` (a Hub id, a local folder, or `tiny`).")


def resolve_model(model_args: ModelConfig, training_args: HPTConfig) -> str:
    """The model path to load. `tiny` builds the tiny local Llama in `output_dir/tiny-init` (once, on the main process)."""
    require_model_name(model_args)
    if model_args.model_name_or_path != TINY_MODEL:
        return model_args.model_name_or_path
    from .tiny import save_tiny_model

    path = os.path.join(training_args.output_dir, TINY_MODEL_FOLDER)
    with training_args.main_process_first(desc="building the tiny model"):
        if not os.path.isfile(os.path.join(path, "config.json")):
            save_tiny_model(path)
    return path


def resolve_checkpoint(training_args: HPTConfig) -> str | None:
    """`resume_from_checkpoint`: a checkpoint folder, or `true`/`last` for the newest complete checkpoint in
    `output_dir` (a torn newer one is skipped with a warning, see `hpt_trl.run_guard`)."""
    from .run_guard import resolve_resume

    return resolve_resume(training_args.resume_from_checkpoint, training_args.output_dir)


def check_output_dir(training_args: HPTConfig, checkpoint: str | None) -> None:
    """Before the model loads: a fresh run into an output_dir holding checkpoints stops (unless
    `overwrite_output_dir`), and a resume needs the checkpoint's optimizer state. The trainer checks again, with the
    settings, when training starts."""
    from .run_guard import check_fresh_output_dir, check_optimizer_state

    if checkpoint is None:
        check_fresh_output_dir(training_args.output_dir, training_args.overwrite_output_dir)
    else:
        check_optimizer_state(checkpoint)


def build_trainer(script_args: HPTScriptArguments, training_args: HPTConfig, model_args: ModelConfig):
    """Build the [`HPTTrainer`] that `hpt-trl train` runs, from the parsed arguments. The data and the rewards are
    loaded and checked before the model."""
    from .hpt_trainer import HPTTrainer

    require_model_name(model_args)
    upgrade_deprecated_reward_names(script_args, training_args)
    if script_args.prompt_template is None and model_args.model_name_or_path != TINY_MODEL:
        script_args.prompt_template = _template(script_args, model_args)
    train_dataset, eval_dataset = load_datasets(script_args, model_args, need_eval=training_args.eval_strategy != "no")
    check_demonstration_column(train_dataset, training_args, describe_data_source(script_args))
    if hasattr(train_dataset, "__len__"):
        from .run_guard import check_dataset_fills_a_generation_batch

        check_dataset_fills_a_generation_batch(len(train_dataset), training_args)
    reward_funcs = load_reward_funcs(script_args)

    model_path = resolve_model(model_args, training_args)
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    model_init_kwargs = {k: v for k, v in model_init_kwargs.items() if v is not None}
    if training_args.model_init_kwargs is not None:
        model_init_kwargs.update(training_args.model_init_kwargs)
    training_args.model_init_kwargs = model_init_kwargs

    return HPTTrainer(
        model=model_path,
        reward_funcs=reward_funcs,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )


def save_merged_adapter(trainer, output_dir: str) -> str | None:
    """Merge the LoRA adapter saved in `output_dir` into its base model and save it to `output_dir/merged`."""
    if not trainer.accelerator.is_main_process:
        return None
    from peft import AutoPeftModelForCausalLM

    merged_dir = os.path.join(output_dir, "merged")
    model = AutoPeftModelForCausalLM.from_pretrained(output_dir, dtype="auto").merge_and_unload()
    model.save_pretrained(merged_dir)
    trainer.processing_class.save_pretrained(merged_dir)
    return merged_dir


def run(script_args: HPTScriptArguments, training_args: HPTConfig, model_args: ModelConfig):
    """Train, save (and merge, and push) as `trl grpo` does; return the trainer. The main process holds the lock of
    `output_dir` from before the model loads until the final save is done (`hpt_trl.run_guard`)."""
    from .run_guard import disk_full_explained, output_dir_lock

    with output_dir_lock(training_args.output_dir, enabled=training_args.process_index == 0):
        checkpoint = resolve_checkpoint(training_args)
        check_output_dir(training_args, checkpoint)
        trainer = build_trainer(script_args, training_args, model_args)
        trainer.train(resume_from_checkpoint=checkpoint)
        distributed = trainer.is_deepspeed_enabled or trainer.is_fsdp_enabled
        if trainer.finished_before_training and distributed:  # the model was not loaded from the checkpoint
            trainer.accelerator.print(f"Nothing trained: the finished model is in {checkpoint}.")
            return trainer
        trainer.accelerator.print(
            "✅ Training completed." if not trainer.finished_before_training else "Nothing to train."
        )

        with disk_full_explained(training_args.output_dir):
            trainer.save_model(training_args.output_dir)
            # trainer_state.json (the log history) in output_dir, also with `save_strategy: no`: `hpt-trl plot` reads it
            trainer.save_state()
        trainer.accelerator.print(f"💾 Model and trainer state saved to {training_args.output_dir}.")
    if script_args.merge_adapter and model_args.use_peft:
        trainer.accelerator.wait_for_everyone()
        merged = save_merged_adapter(trainer, training_args.output_dir)
        if merged:
            trainer.accelerator.print(f"💾 Merged model saved to {merged}.")
        trainer.accelerator.wait_for_everyone()

    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=card_dataset_name(script_args))
        trainer.accelerator.print(f"🤗 Model pushed to the Hub in https://huggingface.co/{trainer.hub_model_id}.")
    return trainer


def finish(trainer) -> None:
    """Finish the trackers and destroy the process group (transformers >= 5.18), as `trl grpo` does.

    First drop every reference to the distributed wrapper of the model (DDP module, DeepSpeed engine and its
    optimizer): a wrapper that outlives `destroy_process_group` keeps the gloo process group alive until interpreter
    exit, where its threads are destroyed unjoined and the process aborts now and then ("terminate called without an
    active exception", exit code -6, after training and saving). The trainer cannot train after this.
    """
    import gc

    if trainer.accelerator.num_processes > 1:
        if getattr(trainer, "is_deepspeed_enabled", False) and hasattr(trainer.model_wrapped, "destroy"):
            trainer.model_wrapped.destroy()
        trainer.accelerator.free_memory()
        trainer.model_wrapped = trainer.model
        trainer.optimizer = trainer.lr_scheduler = None
        if hasattr(trainer, "deepspeed"):
            trainer.deepspeed = None
        gc.collect()
    if hasattr(trainer, "end"):
        trainer.end()


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--help-all" in argv:
        make_parser().print_help()
        return 0
    if "-h" in argv or "--help" in argv:
        print(short_help())
        return 0
    script_args, training_args, model_args = parse_args(argv)
    finish(run(script_args, training_args, model_args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
