"""The `hpt-trl` command: `quickstart`, `train`, `eval` and `plot`."""

import importlib
import sys

COMMANDS = {
    "quickstart": ("hpt_trl.quickstart", "Train a tiny model with HPT on a toy math task, offline, on CPU."),
    "train": ("hpt_trl.train", "Train with HPT from a recipe: hpt-trl train --config recipes/NAME.yaml [--key value]."),
    "eval": ("hpt_trl.evaluation", "Evaluate a model on math benchmarks (avg@k and pass@k with math-verify)."),
    "plot": ("hpt_trl.plotting", "Plot training dynamics from OUTPUT_DIR/trainer_state.json."),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = ["usage: hpt-trl COMMAND [options]", "", "commands:"]
        lines += [f"  {name:<11} {help_text}" for name, (_, help_text) in COMMANDS.items()]
        print("\n".join(lines))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(COMMANDS[argv[0]][0])
    return module.main(argv[1:]) or 0


if __name__ == "__main__":
    sys.exit(main())
