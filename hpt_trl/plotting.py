"""Training-dynamics plots from a Trainer's log history, as in the HPT paper's Fig. 6 and 7.

`hpt-trl plot OUTPUT_DIR [--out DIR]` reads `OUTPUT_DIR/trainer_state.json` (or that of the latest
`OUTPUT_DIR/checkpoint-*/`) and writes one PNG per metric, plus an overview with all of them:

| file | logged metric | meaning |
| --- | --- | --- |
| `sft_share.png` | `hpt/sft_fraction` | share of prompts trained with SFT (P <= gamma) in each step |
| `reward.png` | `reward` | mean reward of the rollouts |
| `performance.png` | `hpt/performance_mean` | mean performance P of the prompts |
| `entropy.png` | `entropy` | mean token entropy of the policy on its rollouts in the loss |
| `entropy_kept_rows.png` | `hpt/kept_rows/entropy` | the same, over the rollouts that were run when `skip_zero_loss_rows` skips the zero-loss ones |
| `completion_length.png` | `completions/mean_length` | mean rollout length, in tokens |
| `training_dynamics.png` | all of the above | overview |

A step where no rollout is in the loss (every prompt on SFT) has no entropy: it is logged as missing, not 0, and
left out of the plot. A metric no step logged gets no PNG, and `hpt-trl plot` says so (see [`plot_notes`]); a series
that is the same at every step is drawn with a note saying so on its panel.

`hpt-trl train` writes `OUTPUT_DIR/trainer_state.json` at the end of training, whatever its `save_strategy`. The
Trainer itself writes it with each checkpoint (or on `trainer.save_state()`): a script of your own that trains with
`save_strategy="no"` should call `trainer.save_state()`, or plot `trainer.state.log_history` with
[`plot_training_dynamics`].
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator, PercentFormatter  # noqa: E402

# Logged metric -> (file name, title, y-axis label)
METRICS = {
    "hpt/sft_fraction": ("sft_share.png", "SFT share of prompts", "prompts trained with SFT"),
    "reward": ("reward.png", "Mean reward", "reward"),
    "hpt/performance_mean": ("performance.png", "Performance P", "mean P (rollout success rate)"),
    "entropy": ("entropy.png", "Entropy", "token entropy (nats)"),
    "hpt/kept_rows/entropy": ("entropy_kept_rows.png", "Entropy (rollouts run)", "token entropy (nats)"),
    "completions/mean_length": ("completion_length.png", "Completion length", "tokens"),
}
OVERVIEW_FILE = "training_dynamics.png"
LABELS = {key: title for key, (_, title, _) in METRICS.items()}
_PERCENT_KEYS = {"hpt/sft_fraction"}


def _points(log_history: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of `key` in training log entries; missing, `None` and non-numeric values are skipped."""
    steps, values = [], []
    for entry in log_history:
        value = entry.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "step" in entry:
            steps.append(entry["step"])
            values.append(float(value))
    return steps, values


def constant_value(values: list[float]) -> float | None:
    """The value of a series whose finite values (at least two) are all equal, else `None`."""
    finite = [v for v in values if math.isfinite(v)]
    return finite[0] if len(finite) >= 2 and len(set(finite)) == 1 else None


def _moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last `window` finite values (NaN values are ignored)."""
    averaged = []
    for i in range(len(values)):
        chunk = [v for v in values[max(0, i - window + 1) : i + 1] if math.isfinite(v)]
        averaged.append(sum(chunk) / len(chunk) if chunk else float("nan"))
    return averaged


def _draw(axis, steps: list[float], values: list[float], key: str, smooth: bool = True) -> None:
    """Draw one metric on `axis` with a title, axis labels and a grid; long runs get a moving average on top."""
    _, title, ylabel = METRICS.get(key, (None, key, key))
    window = max(2, len(values) // 20) if smooth and len(values) >= 40 else 1
    if window > 1:
        axis.plot(steps, values, color="tab:blue", alpha=0.3, linewidth=0.8, label="per step")
        axis.plot(steps, _moving_average(values, window), color="tab:blue", linewidth=1.8,
                  label=f"moving average ({window} steps)")  # fmt: skip
        axis.legend(loc="best", fontsize=8, frameon=False)
    elif values:
        axis.plot(steps, values, color="tab:blue", marker="o" if len(values) <= 30 else None, markersize=3)
    else:
        axis.text(0.5, 0.5, f"no `{key}` logged", ha="center", va="center", transform=axis.transAxes, color="gray")
    constant = constant_value(values)
    if constant is not None:  # matplotlib centres a flat line on an arbitrary range (0 -> -0.04..0.04): say so
        axis.text(0.5, 0.9, f"constant: {constant:g} at every logged step", ha="center", va="top",
                  transform=axis.transAxes, color="dimgray", fontsize=9)  # fmt: skip
    if key in _PERCENT_KEYS:
        axis.set_ylim(-0.03, 1.03)
        axis.yaxis.set_major_formatter(PercentFormatter(xmax=1.0, decimals=0))
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.set_title(title, fontsize=11)
    axis.set_xlabel("training step")
    axis.set_ylabel(ylabel)
    axis.grid(alpha=0.3)


def plot_training_dynamics(log_history: list[dict], path: str, keys=("hpt/sft_fraction", "reward")) -> str:
    """
    Plot one panel per metric against the optimizer step and save the figure as a PNG.

    Args:
        log_history (`list[dict]`):
            `trainer.state.log_history`, or the `log_history` of a `trainer_state.json`.
        path (`str`):
            Where to write the PNG.
        keys (`tuple[str, ...]`, *optional*):
            Logged metrics to plot, one panel each (see `METRICS` for the HPT ones).

    Returns:
        `str`: `path`.
    """
    keys = list(keys)
    columns = min(len(keys), 3)
    rows = math.ceil(len(keys) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.8 * columns, 3.4 * rows), squeeze=False)
    for axis, key in zip(axes.flat, keys):
        _draw(axis, *_points(log_history, key), key)
    for axis in list(axes.flat)[len(keys) :]:
        axis.set_visible(False)
    figure.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return str(path)


def _checkpoint_number(path: Path) -> int:
    match = re.fullmatch(r"checkpoint-(\d+)", path.name)
    return int(match.group(1)) if match else -1


def find_trainer_state(path: str | os.PathLike) -> Path:
    """Return the `trainer_state.json` of a run.

    Args:
        path (`str` or `os.PathLike`):
            A `trainer_state.json` file, a folder holding one (an output dir or a checkpoint), or an output dir whose
            latest `checkpoint-*/` holds one.

    Raises:
        `FileNotFoundError`: when there is none, with a message that says where it looked.
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{str(path)!r} does not exist: pass a training output dir or a trainer_state.json.")
    if (path / "trainer_state.json").is_file():
        return path / "trainer_state.json"
    checkpoints = sorted((p for p in path.glob("checkpoint-*") if _checkpoint_number(p) >= 0), key=_checkpoint_number)
    for checkpoint in reversed(checkpoints):
        if (checkpoint / "trainer_state.json").is_file():
            return checkpoint / "trainer_state.json"
    raise FileNotFoundError(
        f"No trainer_state.json in {str(path)!r} or in a checkpoint-*/ folder under it. The Trainer writes it with "
        "each checkpoint (save_strategy='steps' or 'epoch') and with trainer.save_state(); a run with "
        "save_strategy='no' has none (plot trainer.state.log_history with "
        "hpt_trl.plotting.plot_training_dynamics instead)."
    )


def load_log_history(path: str | os.PathLike) -> list[dict]:
    """The `log_history` of the `trainer_state.json` found by [`find_trainer_state`]."""
    return _read_log_history(find_trainer_state(path))


def _read_log_history(state_file: Path) -> list[dict]:
    """The `log_history` of `state_file`; a `ValueError` naming the file when it is not valid JSON."""
    try:
        with open(state_file) as f:
            return json.load(f).get("log_history", [])
    except json.JSONDecodeError as error:
        raise ValueError(
            f"{state_file} is not valid JSON ({error}): it was probably torn by a kill while it was written. Plot "
            "an earlier checkpoint's trainer_state.json instead (pass its checkpoint-*/ folder)."
        ) from error


def plot_run(
    path: str | os.PathLike, out_dir: str | os.PathLike | None = None, metrics=tuple(METRICS), overview: bool = True
) -> list[str]:
    """
    Plot the training dynamics of a run from its `trainer_state.json`: one PNG per metric, and an overview.

    Args:
        path (`str` or `os.PathLike`):
            The run's output dir (its `trainer_state.json`, or that of its latest `checkpoint-*/`), a checkpoint dir,
            or a `trainer_state.json` file.
        out_dir (`str`, `os.PathLike` or `None`, *optional*):
            Where to write the PNGs; default `plots/` next to the `trainer_state.json` that was read (for an output
            dir whose state is in a checkpoint: `OUTPUT_DIR/plots/`).
        metrics (`tuple[str, ...]`, *optional*):
            Logged metrics to plot; defaults to the keys of `METRICS`. Metrics the run did not log (for example
            `hpt/sft_fraction` of a plain GRPO run) are skipped.
        overview (`bool`, *optional*, defaults to `True`):
            Also write `training_dynamics.png` with one panel per plotted metric.

    Returns:
        `list[str]`: Paths of the written PNGs, per-metric files first, the overview last.

    Raises:
        `FileNotFoundError`: no `trainer_state.json` was found.
        `ValueError`: none of `metrics` was logged.
    """
    state_file = find_trainer_state(path)
    log_history = _read_log_history(state_file)
    if out_dir is None:
        root = Path(path) if Path(path).is_dir() else state_file.parent
        out_dir = root / "plots"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    present = [key for key in metrics if _points(log_history, key)[0]]
    if not present:
        logged = sorted({k for entry in log_history for k in entry if k not in ("step", "epoch")})
        raise ValueError(f"{state_file} logs none of {list(metrics)}; it logs {logged}.")
    written = []
    for key in present:
        name = METRICS[key][0] if key in METRICS else re.sub(r"[^A-Za-z0-9_.-]+", "_", key) + ".png"
        figure, axis = plt.subplots(figsize=(6, 3.8))
        _draw(axis, *_points(log_history, key), key)
        figure.tight_layout()
        figure.savefig(out_dir / name, dpi=120)
        plt.close(figure)
        written.append(str(out_dir / name))
    if overview:
        written.append(plot_training_dynamics(log_history, str(out_dir / OVERVIEW_FILE), keys=present))
    return written


def plot_notes(log_history: list[dict], metrics=tuple(METRICS)) -> list[str]:
    """
    What a reader of the plots should know about `metrics` in `log_history`: each metric that no step logged (so it
    gets no PNG), with the likely reason for HPT's metrics, and each series that is constant. `hpt-trl plot` prints
    them on stderr, after the paths.

    Args:
        log_history (`list[dict]`):
            `trainer.state.log_history`, or the `log_history` of a `trainer_state.json`.
        metrics (`tuple[str, ...]`, *optional*):
            The metrics that were asked for; defaults to the keys of `METRICS`.

    Returns:
        `list[str]`: One line per note, in the order of `metrics`.
    """
    logged = {key for key in metrics if _points(log_history, key)[0]}
    notes = []
    for key in metrics:
        name = METRICS[key][0] if key in METRICS else key
        if key not in logged:
            reason = ""
            if key == "entropy" and "hpt/kept_rows/entropy" in logged:
                reason = (
                    " (skip_zero_loss_rows was on: the entropy of the rollouts that were run is in "
                    f"{METRICS['hpt/kept_rows/entropy'][0]})"
                )
            elif key in ("entropy", "hpt/kept_rows/entropy"):
                reason = " (no step had a rollout in its loss, e.g. every prompt was trained with SFT)"
            elif key.startswith("hpt/"):
                reason = " (not an HPTTrainer run?)"
            notes.append(f"{name} not written: no step logged `{key}`{reason}.")
            continue
        constant = constant_value(_points(log_history, key)[1])
        if constant is not None:
            notes.append(f"{name}: `{key}` is {constant:g} at every logged step.")
    return notes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpt-trl plot",
        description="Plot the training dynamics of a run (SFT share, reward, performance P, entropy, completion "
        "length) from its trainer_state.json, as PNGs.",
    )
    parser.add_argument(
        "output_dir",
        metavar="OUTPUT_DIR",
        help="Training output dir (or a checkpoint dir, or a trainer_state.json file).",
    )
    parser.add_argument("--out", default=None, help="Where to write the PNGs (default: OUTPUT_DIR/plots).")
    parser.add_argument(
        "--metrics",
        default=None,
        help=f"Comma-separated logged metrics to plot (default: {','.join(METRICS)}).",
    )
    parser.add_argument("--no-overview", action="store_true", help=f"Do not write {OVERVIEW_FILE}.")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `hpt-trl plot`: prints the written paths; returns 0, or 1 with a message on stderr."""
    args = build_parser().parse_args(argv)
    metrics = tuple(m.strip() for m in args.metrics.split(",") if m.strip()) if args.metrics else tuple(METRICS)
    try:
        paths = plot_run(args.output_dir, args.out, metrics=metrics, overview=not args.no_overview)
    except (FileNotFoundError, ValueError) as error:
        print(f"hpt-trl plot: error: {error}", file=sys.stderr)
        return 1
    print("\n".join(paths))
    for note in plot_notes(load_log_history(args.output_dir), metrics):  # stdout stays one path per line
        print(f"note: {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
