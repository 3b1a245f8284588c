"""The `hpt-trl` command: `quickstart`, `train`, `eval` and `plot`.

Options are spelled `--snake_case` in every command, as in `trl` and the recipes' YAML keys (`--max_steps`,
`--num_samples`, `--output_dir`); the `--kebab-case` spelling (`--max-steps`) is accepted too. This module imports
nothing heavy: `hpt-trl --help`, `--version` and `plot --help` / `eval --help` do not import torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    "quickstart": ("hpt_trl.quickstart", "Train a tiny model with HPT on a toy math task, offline, on CPU."),
    "train": ("hpt_trl.train", "Train with HPT from a recipe: hpt-trl train --config recipes/NAME.yaml [--key value]."),
    "eval": ("hpt_trl.evaluation", "Evaluate a model on math benchmarks (avg@k and pass@k with math-verify)."),
    "plot": ("hpt_trl.plotting", "Plot training dynamics from OUTPUT_DIR/trainer_state.json."),
}


def version() -> str:
    from . import __version__

    return __version__


def usage() -> str:
    lines = ["usage: hpt-trl [--version] [--help] COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<11} {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", "Options are spelled --snake_case (--kebab-case works too); `hpt-trl COMMAND --help` lists them."]
    return "\n".join(lines)


def add_snake_case_aliases(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Give every `--kebab-case` option of `parser` the `--snake_case` spelling, listed first in `--help` (as
    `HfArgumentParser` lists `--max_steps, --max-steps`); the kebab-case spelling keeps working. Returns `parser`."""
    for action in list(parser._actions):
        for option in list(action.option_strings):
            alias = "--" + option[2:].replace("-", "_") if option.startswith("--") else option
            if alias != option and alias not in parser._option_string_actions:
                action.option_strings.insert(action.option_strings.index(option), alias)
                parser._option_string_actions[alias] = action
    return parser


def snake_to_known_options(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """Rewrite each `--snake_case` option of `argv` that `parser` only knows as `--kebab-case` (other tokens as is)."""
    known, rewritten = set(parser._option_string_actions), []
    for position, token in enumerate(argv):
        if token == "--":
            return rewritten + argv[position:]
        name, equals, value = token.partition("=")
        kebab = "--" + name[2:].replace("_", "-")
        if name.startswith("--") and name not in known and kebab in known:
            token = kebab + equals + value
        rewritten.append(token)
    return rewritten


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        print(usage(), file=sys.stderr)
        return 2
    command, options = argv[0], argv[1:]
    if command in ("-h", "--help"):
        print(usage())
        return 0
    if command in ("-V", "--version"):
        print(f"hpt-trl {version()}")
        return 0
    if command not in COMMANDS:
        print(f"hpt-trl: unknown command: {command}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[command][0])
    build_parser = getattr(module, "build_parser", None)
    if build_parser is not None:  # argparse commands: accept the --snake_case spelling of their options
        if "-h" in options or "--help" in options:
            add_snake_case_aliases(build_parser()).print_help()
            return 0
        options = snake_to_known_options(build_parser(), options)
    return module.main(options) or 0


if __name__ == "__main__":
    sys.exit(main())
