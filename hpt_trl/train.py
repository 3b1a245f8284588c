"""`hpt-trl train`: train with HPT from a recipe, like `trl grpo`.

    hpt-trl train --config recipes/tiny_cpu.yaml [--key value ...]
    accelerate launch --config_file examples/accelerate_configs/zero3.yaml -m hpt_trl.cli train --config recipes/NAME.yaml

The command line is parsed by TRL's `TrlParser` into three dataclasses, as `trl grpo` does: [`HPTScriptArguments`]
(data and rewards), [`~hpt_trl.HPTConfig`] (every `GRPOConfig` option plus the HPT ones) and [`~trl.ModelConfig`]
(model and LoRA). A `--config` YAML file sets the defaults; any option given on the command line overrides it.

Datasets (`dataset_name`): `toy` (the built-in toy arithmetic task), `gsm8k`, `math`, `math500`, `openr1_math_46k` (the
paper's training set; alias `openr1`), a local `.jsonl`/`.json`/`.parquet` file or `save_to_disk` folder, or any Hub
dataset id with the columns `prompt`, `completion` (the demonstration) and `solution`. `data_files` reads a local file
instead. Model: any `model_name_or_path`, or `tiny` to build the tiny local Llama of `hpt_trl.tiny` (offline, for CPU).
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
from dataclasses import dataclass, field

from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from .hpt_config import HPTConfig

logger = logging.getLogger(__name__)

TINY_MODEL = "tiny"
TINY_MODEL_FOLDER = "tiny-init"  # where `model_name_or_path: tiny` is built, inside output_dir

# Dataset names handled by `hpt_trl.data` (name -> loader name, Hub id written in the model card)
BUILTIN_DATASETS = {
    "gsm8k": ("load_gsm8k", "openai/gsm8k"),
    "math": ("load_math", "DigitalLearningGmbH/MATH-lighteval"),
    "math500": ("load_math500", "HuggingFaceH4/MATH-500"),
    "openr1_math_46k": ("load_openr1_math_46k", "Elliott/Openr1-Math-46k-8192"),
    "openr1": ("load_openr1_math_46k", "Elliott/Openr1-Math-46k-8192"),
}
TOY_DATASET = "toy"


@dataclass
class HPTScriptArguments(ScriptArguments):
    """
    Script arguments of `hpt-trl train` (the data and reward options; training options are in [`HPTConfig`], model
    options in [`~trl.ModelConfig`]).

    Args:
        dataset_name (`str`, *optional*):
            `toy`, `gsm8k`, `math`, `math500`, `openr1_math_46k` (alias `openr1`), a local file or folder, or a Hub
            dataset id whose rows have `prompt`, `completion` (demonstration) and `solution` columns.
        data_files (`str`, *optional*):
            A local `.jsonl`, `.json` or `.parquet` file (or `save_to_disk` folder) to train on, instead of
            `dataset_name`. Rows in the HPT schema are used as they are; GSM8K, MATH and OpenR1 schemas are mapped.
        dataset_limit (`int`, *optional*):
            Keep only the first `dataset_limit` training rows.
        conversational (`bool`, *optional*, defaults to `False`):
            Build conversational prompts and demonstrations (lists of messages) for the built-in datasets.
        prompt_template (`str`, *optional*):
            Prompt template of the built-in math datasets: `luffy` (the paper's system prompt, used with Qwen), `simple`
            (used with LLaMA) or `none`. Default: the paper's choice for the model family.
        reward_funcs (`list[str]`, *optional*, defaults to `["accuracy_reward"]`):
            Reward functions: `accuracy_reward` (math-verify, with a deadline: `hpt_trl.rewards`),
            `trl_accuracy_reward`, `reasoning_accuracy_reward`, `think_format_reward`,
            `get_soft_overlong_punishment`, `toy_answer_reward` (the toy task's), or a dotted import path.
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
            "help": "A local .jsonl/.json/.parquet file or save_to_disk folder to train on (replaces dataset_name)."
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
        default_factory=lambda: ["accuracy_reward"],
        metadata={
            "help": "Reward functions: accuracy_reward (hpt_trl.rewards), trl_accuracy_reward, "
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
        "accuracy_reward": math_accuracy_reward,
        "trl_accuracy_reward": accuracy_reward,
        "reasoning_accuracy_reward": reasoning_accuracy_reward,
        "think_format_reward": think_format_reward,
        "get_soft_overlong_punishment": get_soft_overlong_punishment(max_completion_len=1280, soft_punish_cache=256),
        "toy_answer_reward": toy_answer_reward,
    }


def load_reward_funcs(script_args: HPTScriptArguments) -> list:
    """The reward models and functions named in `script_args`, as TRL's `grpo` script resolves them."""
    registry = _reward_registry()
    reward_funcs = [script_args.reward_model_name_or_path] if script_args.reward_model_name_or_path else []
    for name in script_args.reward_funcs or []:
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
    """Return `(train_dataset, eval_dataset or None)` with columns `prompt`, `completion` and `solution`."""
    from datasets import load_dataset

    from . import data

    name, limit = script_args.dataset_name, script_args.dataset_limit
    train_split, test_split = script_args.dataset_train_split, script_args.dataset_test_split

    def limited(dataset):
        return dataset.select(range(min(limit, len(dataset)))) if limit is not None else dataset

    def hpt_schema(dataset):
        if {"prompt", "completion", "solution"} <= set(dataset.column_names):
            return dataset
        return data.to_hpt(dataset, conversational=script_args.conversational, template=script_args.prompt_template)

    if script_args.data_files is not None:
        return limited(hpt_schema(data.read_local(script_args.data_files))), None
    if name is None:
        raise ValueError(
            "Set `dataset_name` (toy, gsm8k, math, math500, openr1_math_46k, a path or a Hub id) or `data_files`."
        )
    if name == TOY_DATASET:
        from .toy_task import build_toy_math_dataset

        splits = build_toy_math_dataset(seed=0, conversational=script_args.conversational)
        return limited(splits["train"]), (splits["test"] if need_eval else None)
    if name in BUILTIN_DATASETS:
        loader = getattr(data, BUILTIN_DATASETS[name][0])
        kwargs = dict(conversational=script_args.conversational, template=_template(script_args, model_args))
        train = loader(split=train_split, limit=limit, **kwargs)
        if not need_eval:
            return train, None
        # MATH-500 is the usual held-out set of the math recipes
        eval_name = name if name in ("gsm8k", "math") else "math500"
        eval_loader = getattr(data, BUILTIN_DATASETS[eval_name][0])
        return train, eval_loader(split="test", **kwargs)
    if os.path.exists(name):
        return limited(hpt_schema(data.read_local(name))), None
    dataset = load_dataset(name, name=script_args.dataset_config, streaming=script_args.dataset_streaming)
    train = dataset[train_split]
    return (train if script_args.dataset_streaming else limited(hpt_schema(train))), (
        hpt_schema(dataset[test_split]) if need_eval and test_split in dataset else None
    )


def card_dataset_name(script_args: HPTScriptArguments) -> str | None:
    """The dataset's Hub id for the model card (`None` for local data and the toy task)."""
    name = script_args.dataset_name
    if script_args.data_files is not None or name is None or name == TOY_DATASET or os.path.exists(name):
        return None
    return BUILTIN_DATASETS[name][1] if name in BUILTIN_DATASETS else name


# Model


def resolve_model(model_args: ModelConfig, training_args: HPTConfig) -> str:
    """The model path to load. `tiny` builds the tiny local Llama in `output_dir/tiny-init` (once, on the main process)."""
    if model_args.model_name_or_path is None:
        raise ValueError("Set `model_name_or_path` (a Hub id, a local folder, or `tiny`).")
    if model_args.model_name_or_path != TINY_MODEL:
        return model_args.model_name_or_path
    from .tiny import save_tiny_model

    path = os.path.join(training_args.output_dir, TINY_MODEL_FOLDER)
    with training_args.main_process_first(desc="building the tiny model"):
        if not os.path.isfile(os.path.join(path, "config.json")):
            save_tiny_model(path)
    return path


def resolve_checkpoint(training_args: HPTConfig) -> str | bool | None:
    """`resume_from_checkpoint`: a checkpoint folder, or `true`/`last` for the last checkpoint in `output_dir`."""
    value = training_args.resume_from_checkpoint
    if isinstance(value, str) and value.lower() in ("true", "last"):
        from transformers.trainer_utils import get_last_checkpoint

        last = get_last_checkpoint(training_args.output_dir) if os.path.isdir(training_args.output_dir) else None
        if last is None:
            raise ValueError(f"`resume_from_checkpoint={value}` but {training_args.output_dir} has no checkpoint.")
        return last
    if isinstance(value, str) and value.lower() in ("false", "none", ""):
        return None
    return value


def build_trainer(script_args: HPTScriptArguments, training_args: HPTConfig, model_args: ModelConfig):
    """Build the [`HPTTrainer`] that `hpt-trl train` runs, from the parsed arguments."""
    from .hpt_trainer import HPTTrainer

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

    if script_args.prompt_template is None and model_args.model_name_or_path != TINY_MODEL:
        script_args.prompt_template = _template(script_args, model_args)
    train_dataset, eval_dataset = load_datasets(script_args, model_args, need_eval=training_args.eval_strategy != "no")
    return HPTTrainer(
        model=model_path,
        reward_funcs=load_reward_funcs(script_args),
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
    """Train, save (and merge, and push) as `trl grpo` does; return the trainer."""
    trainer = build_trainer(script_args, training_args, model_args)
    trainer.train(resume_from_checkpoint=resolve_checkpoint(training_args))
    trainer.accelerator.print("✅ Training completed.")

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
    script_args, training_args, model_args = parse_args(argv)
    finish(run(script_args, training_args, model_args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
