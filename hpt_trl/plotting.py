"""Training-dynamics plots from a Trainer's log history (as in the HPT paper's Fig. 6 and 7)."""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

LABELS = {
    "hpt/sft_fraction": "SFT share of prompts",
    "reward": "mean reward",
    "hpt/performance_mean": "performance P",
    "entropy": "entropy",
    "completions/mean_length": "completion length (tokens)",
}


def plot_training_dynamics(log_history: list[dict], path: str, keys=("hpt/sft_fraction", "reward")) -> str:
    """
    Plot one panel per metric against the optimizer step and save the figure as a PNG.

    Args:
        log_history (`list[dict]`):
            `trainer.state.log_history`, or the `log_history` of a `trainer_state.json`.
        path (`str`):
            Where to write the PNG.
        keys (`tuple[str, ...]`, *optional*):
            Logged metrics to plot.

    Returns:
        `str`: `path`.
    """
    figure, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.2), squeeze=False)
    for axis, key in zip(axes[0], keys):
        points = [(entry["step"], entry[key]) for entry in log_history if entry.get(key) is not None]
        if points:
            axis.plot(*zip(*points), marker="." if len(points) < 50 else None)
        axis.set_title(LABELS.get(key, key))
        axis.set_xlabel("step")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
