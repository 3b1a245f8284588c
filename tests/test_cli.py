"""The `hpt-trl` command itself: `--version`, `--help`, unknown commands, one option spelling, no torch for help."""

import subprocess
import sys
from importlib.metadata import version

import pytest

from hpt_trl.cli import add_snake_case_aliases, main, snake_to_known_options


def run_without_torch(argv: list[str]) -> subprocess.CompletedProcess:
    """Run `hpt-trl ARGV` in a fresh interpreter and fail if it imported torch."""
    code = (
        "import sys\nfrom hpt_trl.cli import main\n"
        f"status = main({argv!r})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "sys.exit(status)\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"hpt-trl {version('hpt-trl')}"


def test_help_and_unknown_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {command} " in out for command in ("quickstart", "train", "eval", "plot")) and "--version" in out
    assert main(["trian"]) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("hpt-trl: unknown command: trian") and captured.out == ""
    assert main([]) == 2 and "usage: hpt-trl" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["--version"], ["plot", "--help"], ["eval", "--help"], ["nope"]],
    ids=["help", "version", "plot-help", "eval-help", "unknown"],
)
def test_help_does_not_import_torch(argv):
    completed = run_without_torch(argv)
    assert completed.returncode == (2 if argv == ["nope"] else 0), completed.stdout + completed.stderr
    assert "usage:" in completed.stdout + completed.stderr or "hpt-trl 0" in completed.stdout


@pytest.mark.parametrize("command", ["eval", "plot"])
def test_help_spells_options_in_snake_case_like_train(command, capsys):
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    option = {"eval": "--num_samples NUM_SAMPLES", "plot": "--no_overview"}[command]
    kebab = option.split()[0].replace("_", "-") + option[len(option.split()[0]) :]
    assert f"{option}, {kebab}" in text  # as train's TrlParser lists `--max_steps MAX_STEPS, --max-steps MAX_STEPS`


def test_train_help_is_short_and_starts_with_config_and_the_hpt_options(capsys):
    # train's options come from HPTConfig (a TrainingArguments): torch is needed to list them
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    lines = text.splitlines()
    first = {option: next(i for i, line in enumerate(lines) if line.lstrip().startswith(option))
             for option in ("--config", "--gamma", "--performance_reward", "--max_steps")}  # fmt: skip
    assert first["--config"] < first["--gamma"] < first["--performance_reward"] < first["--max_steps"], first
    assert first["--gamma"] < 25, "the HPT options are on the first screen"
    assert len(lines) < 250 and "--max_steps MAX_STEPS, --max-steps MAX_STEPS" in text
    assert "hpt-trl train --help-all" in text and "--beta" not in text  # GRPOConfig's KL coefficient: --help-all

    assert main(["train", "--help-all"]) == 0
    full = capsys.readouterr().out
    assert len(full.splitlines()) > 3 * len(lines) and "--config recipes/NAME.yaml" in full
    for option in ("--gamma", "--beta BETA", "--max_steps MAX_STEPS, --max-steps MAX_STEPS", "--lora_dropout"):
        assert option in full, option


def test_quickstart_help_describes_every_option(capsys):
    from hpt_trl.quickstart import build_parser

    assert main(["quickstart", "--help"]) == 0
    text = capsys.readouterr().out
    for action in build_parser()._actions:
        assert action.help and len(action.help) > 20, f"{action.option_strings} has no description"
    assert "gate threshold" in text and "(default: 600" in text and "--output_dir OUTPUT_DIR, --output-dir" in text


def test_snake_case_options_reach_an_argparse_command():
    from hpt_trl.evaluation import build_parser

    parser = build_parser()
    argv = ["--model", "m", "--num_samples", "4", "--max_new_tokens=8", "--output-dir", "out", "--", "--top_p"]
    assert snake_to_known_options(parser, argv) == [
        "--model", "m", "--num-samples", "4", "--max-new-tokens=8", "--output-dir", "out", "--", "--top_p",
    ]  # fmt: skip
    args = parser.parse_args(snake_to_known_options(parser, argv[:-2]))
    assert (args.num_samples, args.max_new_tokens, args.output_dir) == (4, 8, "out")
    aliased = add_snake_case_aliases(build_parser())
    assert aliased.parse_args(argv[:-2]) == args and aliased.parse_args(["--model", "m", "--top-p", "0.5"]).top_p == 0.5


def test_plot_errors_name_the_problem(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 1
    assert "trainer_state.json" in capsys.readouterr().err
