"""Bad input fails early and says where: the row and column of a bad prompt or demonstration, the reward function and
the column it reads, the option, the file. And secrets (`hub_token`) never reach a file or a log."""

import json
from pathlib import Path

import pytest
from datasets import Dataset
from helpers import tiny_args

from hpt_trl import HPTConfig, HPTTrainer
from hpt_trl.cli import main as cli_main

NEVER_LOADED = "never/loaded"  # a Hub id that cannot load offline: an error naming the data must come first


def _rows(conversational=False, size=4):
    if conversational:
        return [
            {
                "prompt": [{"role": "user", "content": f"{a}+1="}],
                "completion": [{"role": "assistant", "content": f"{a}+1={a + 1}"}],
                "solution": str(a + 1),
            }
            for a in range(size)
        ]
    return [{"prompt": f"{a}+1=", "completion": f"{a}+1={a + 1}", "solution": str(a + 1)} for a in range(size)]


def _with(rows, row, column, value):
    rows[row][column] = value
    return rows


def _without(rows, column):
    return [{k: v for k, v in row.items() if k != column} for row in rows]


def _image_part(rows, row, column):
    message = rows[row][column][0]
    message["content"] = [{"type": "text", "text": message["content"]}, {"type": "image"}]
    for other in rows:  # the same content-block schema in every row, as a real multimodal file has
        if other is not rows[row]:
            other[column][0]["content"] = [{"type": "text", "text": other[column][0]["content"]}]
    return rows


def _rewards(name):
    from trl.rewards import accuracy_reward, think_format_reward

    from hpt_trl.rewards import math_accuracy_reward
    from hpt_trl.toy_task import toy_answer_reward

    return {
        "math": math_accuracy_reward,
        "trl_accuracy": accuracy_reward,
        "think": think_format_reward,
        "toy": toy_answer_reward,
    }[name]


@pytest.mark.parametrize(
    "rows, reward, message",
    [
        (
            lambda: _with(_rows(), 2, "prompt", ""),
            "toy",
            r"Row 2 of the train dataset has an invalid prompt in column 'prompt': it is an empty string",
        ),
        (
            lambda: _with(_rows(), 2, "prompt", None),
            "toy",
            r"Row 2 of the train dataset has an invalid prompt in column 'prompt': it is None",
        ),
        (
            lambda: _with(_rows(conversational=True), 3, "prompt", []),
            "toy",
            r"Row 3 of the train dataset has an invalid prompt in column 'prompt': it is an empty list of messages",
        ),
        (
            lambda: _image_part(_rows(conversational=True), 1, "prompt"),
            "toy",
            r"Row 1 of the train dataset has an invalid prompt in column 'prompt': its message 0 has an 'image' part "
            r"with no image in it, and the dataset has no 'image' or 'images' column",
        ),
        (
            lambda: _image_part(_rows(conversational=True), 1, "completion"),
            "toy",
            r"Row 1 of the train dataset has an invalid demonstration in column 'completion': it has an 'image' part",
        ),
        (
            lambda: _without(_rows(), "solution"),
            "math",
            r"Reward function 'math_accuracy_reward' reads the column 'solution', which the train dataset does not "
            r"have: its columns are \['prompt', 'completion'\]",
        ),
        (
            lambda: _without(_rows(conversational=True), "solution"),
            "trl_accuracy",
            r"Reward function 'accuracy_reward' reads the column 'solution'",
        ),
        (
            lambda: _rows(),
            "think",
            r"Reward function 'think_format_reward' scores conversational completions \(lists of messages\), but the "
            r"prompts of the train dataset are plain text \(row 0 of column 'prompt'\)",
        ),
    ],
    ids=[
        "empty-prompt",
        "none-prompt",
        "empty-message-list",
        "image-part-in-prompt",
        "image-part-in-demonstration",
        "missing-reward-column",
        "missing-reward-column-trl",
        "think-format-on-plain-text",
    ],
)
def test_bad_data_fails_before_the_model_loads(tmp_path, rows, reward, message):
    with pytest.raises(ValueError, match=message):
        HPTTrainer(
            model=NEVER_LOADED, reward_funcs=_rewards(reward), args=tiny_args(tmp_path),
            train_dataset=Dataset.from_list(rows()),
        )  # fmt: skip


def test_bad_eval_prompt_fails_before_the_model_loads(tmp_path):
    with pytest.raises(ValueError, match=r"Row 1 of the eval dataset has an invalid prompt in column 'prompt': it is"):
        HPTTrainer(
            model=NEVER_LOADED, reward_funcs=_rewards("toy"), args=tiny_args(tmp_path),
            train_dataset=Dataset.from_list(_rows()), eval_dataset=Dataset.from_list(_with(_rows(), 1, "prompt", None)),
        )  # fmt: skip


def test_good_data_passes_the_checks(tmp_path):
    """The checks let through what TRL accepts: conversational data for TRL's rewards, text content blocks, a reward
    whose column has a default, and an image part whose image comes from an `images` column."""
    from hpt_trl.dataset_checks import check_training_data

    def reward_with_default(completions, solution=None, **kwargs):
        return [0.0] * len(completions)

    conversational = Dataset.from_list(_rows(conversational=True))
    check_training_data(conversational, [_rewards("think"), _rewards("trl_accuracy"), _rewards("math")])
    check_training_data(Dataset.from_list(_without(_rows(), "solution")), [reward_with_default])
    blocks = Dataset.from_list(_image_part(_rows(conversational=True), 1, "prompt")).add_column("images", [[]] * 4)
    check_training_data(blocks, [_rewards("toy")])


def test_streamed_bad_prompt_names_its_row(tmp_path):
    from hpt_trl.dataset_checks import check_training_data

    stream = Dataset.from_list(_with(_rows(size=8), 5, "prompt", " ")).to_iterable_dataset()
    checked = check_training_data(stream, [_rewards("toy")])
    with pytest.raises(ValueError, match=r"Row 5 of the train dataset has an invalid prompt in column 'prompt'"):
        list(checked)


def test_demonstration_the_tokenizer_drops_fails_before_training(tmp_path):
    from hpt_trl.tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()  # character level: characters outside its alphabet are dropped
    assert tokenizer("\u00e9\u00e9", add_special_tokens=False)["input_ids"] == []
    rows = _with(_rows(), 2, "completion", "\u00e9\u00e9")
    with pytest.raises(
        ValueError,
        match=r"Row 2 of the train dataset has a demonstration in column 'completion' that tokenizes to no token of "
        r"its own \(only the end-of-turn token\)",
    ):
        HPTTrainer(
            model=build_tiny_model(tokenizer), reward_funcs=_rewards("toy"), args=tiny_args(tmp_path),
            train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        )  # fmt: skip


@pytest.mark.parametrize("temperature", [0.0, -0.5, float("nan")])
def test_config_rejects_a_temperature_that_cannot_sample(tmp_path, temperature):
    with pytest.raises(ValueError, match=r"`temperature` must be a finite number > 0.0"):
        HPTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, temperature=temperature)


TRAIN_TINY = ["--model_name_or_path", "tiny", "--use_cpu", "true", "--bf16", "false", "--report_to", "none"]
TRAIN_TINY += ["--per_device_train_batch_size", "4", "--num_generations", "2", "--max_completion_length", "4"]
TRAIN_TINY += ["--max_steps", "1", "--logging_steps", "1"]


def test_cli_data_file_without_the_reward_column_fails_before_training(tmp_path):
    data_file = tmp_path / "no_solution.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in _without(_rows(), "solution")))
    argv = ["train", *TRAIN_TINY, "--data_files", str(data_file), "--output_dir", str(tmp_path / "run")]
    with pytest.raises(ValueError, match=r"Reward function 'math_accuracy_reward' reads the column 'solution'"):
        cli_main(argv)


# --- hpt-trl eval and plot: a clear message naming the file, no traceback -------------------------------------------


def test_eval_names_a_model_dir_without_a_tokenizer(tmp_path, capsys):
    from hpt_trl.tiny import save_tiny_model

    model_dir = Path(save_tiny_model(str(tmp_path / "model")))
    for file in model_dir.iterdir():
        if file.name not in ("config.json", "model.safetensors", "generation_config.json"):
            file.unlink()
    data_file = Path(__file__).parent / "fixtures" / "gsm8k.jsonl"
    status = cli_main(["eval", "--model", str(model_dir), "--data_file", str(data_file), "--limit", "1",
                       "--output_dir", str(tmp_path / "eval")])  # fmt: skip
    error = capsys.readouterr().err
    assert status == 1
    assert f"hpt-trl eval: error: {str(model_dir)!r} has no tokenizer" in error and "Traceback" not in error


def test_eval_names_an_empty_data_file(tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    status = cli_main(["eval", "--model", NEVER_LOADED, "--data_file", str(empty), "--output_dir", str(tmp_path)])
    error = capsys.readouterr().err
    assert status == 1
    assert f"The data file {str(empty)!r} is empty: it has no rows" in error and "Traceback" not in error


def test_plot_names_a_torn_trainer_state(tmp_path, capsys):
    state = tmp_path / "trainer_state.json"
    state.write_text('{"log_history": [{"step": 1, "reward": 0.5}, {"step": 2, "rew')
    assert cli_main(["plot", str(tmp_path)]) == 1
    error = capsys.readouterr().err
    assert f"{state} is not valid JSON" in error and "torn" in error


# --- Secrets --------------------------------------------------------------------------------------------------------

SECRET = "hf_SECRETdoNotWriteMe0123456789"


def _files_holding(root: Path, text: str) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes())


def test_hub_token_never_reaches_the_disk_or_the_logs(tmp_path, capfd, caplog):
    import torch

    out = tmp_path / "run"
    data_file = tmp_path / "data.jsonl"
    data_file.write_text("".join(json.dumps(row) + "\n" for row in _rows()))
    argv = ["train", *TRAIN_TINY, "--data_files", str(data_file), "--reward_funcs", "toy_answer_reward"]
    argv += ["--max_steps", "2", "--save_strategy", "steps", "--save_steps", "1", "--output_dir", str(out)]
    with caplog.at_level("INFO"):
        cli_main([*argv, "--hub_token", SECRET])
    assert (out / "checkpoint-2" / "training_args.bin").is_file() and (out / "training_args.bin").is_file()
    assert _files_holding(out, SECRET) == []
    captured = capfd.readouterr()
    assert SECRET not in captured.out + captured.err + caplog.text
    # the saved arguments are otherwise whole, and the running process keeps the token for push_to_hub
    saved = torch.load(out / "training_args.bin", weights_only=False)
    assert saved.hub_token is None and saved.max_steps == 2 and saved.output_dir == str(out)


def test_config_keeps_the_token_in_the_process_but_not_in_its_repr_or_pickle(tmp_path):
    import copy
    import pickle

    config = HPTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, hub_token=SECRET)
    assert config.hub_token == SECRET and copy.deepcopy(config).hub_token == SECRET
    assert SECRET not in repr(config) and SECRET not in str(config) and SECRET not in config.to_json_string()
    assert SECRET.encode() not in pickle.dumps(config) and pickle.loads(pickle.dumps(config)).hub_token is None


def test_provenance_redacts_tokens_on_the_command_line():
    from hpt_trl.provenance import provenance

    command = provenance(["hpt-trl", "train", "--hub_token", SECRET, f"--hub-token={SECRET}", "--max_steps", "2"])
    assert SECRET not in json.dumps(command) and "--max_steps 2" in command["command"]
