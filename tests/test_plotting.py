"""`hpt-trl plot` and `hpt_trl.plotting`: PNGs of the training dynamics from a run's trainer_state.json."""

import json
import os

import matplotlib.image
import pytest

from hpt_trl import HPTConfig, HPTTrainer
from hpt_trl.cli import main as cli_main
from hpt_trl.plotting import METRICS, OVERVIEW_FILE, find_trainer_state, plot_run, plot_training_dynamics
from hpt_trl.tiny import build_tiny_model, build_tiny_tokenizer
from hpt_trl.toy_task import build_toy_math_dataset, toy_answer_reward

METRIC_FILES = ["sft_share.png", "reward.png", "performance.png", "entropy.png", "completion_length.png"]


def assert_real_png(path, min_bytes=5_000):
    """A readable PNG of a plausible size whose pixels are not all one colour (axes, labels and a curve were drawn)."""
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] >= 200 and image.shape[1] >= 300, (path, image.shape)
    drawn = (image[..., :3] < 0.9).any(axis=-1).mean()  # share of non-white pixels
    assert 0.005 < drawn < 0.9, f"{path}: {drawn:.1%} of the pixels are drawn"
    assert os.path.getsize(path) >= min_bytes, path


def fake_log_history(steps=60, hpt=True):
    history = []
    for step in range(1, steps + 1):
        entry = {
            "step": step,
            "loss": 1.0 / step,
            "reward": step / steps,
            "entropy": 0.5,
            "completions/mean_length": 20.0,
        }
        if hpt:
            entry.update({"hpt/sft_fraction": 1 - step / steps, "hpt/performance_mean": step / steps})
        history.append(entry)
    history.append({"step": steps, "train_runtime": 1.0, "train_loss": 0.1})  # the summary entry has no metrics
    return history


def write_state(directory, log_history):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "trainer_state.json").write_text(json.dumps({"global_step": 3, "log_history": log_history}))
    return directory / "trainer_state.json"


def test_metrics_and_file_names():
    assert [METRICS[k][0] for k in METRICS] == [*METRIC_FILES[:4], "entropy_kept_rows.png", METRIC_FILES[4]]
    assert list(METRICS) == [
        "hpt/sft_fraction",
        "reward",
        "hpt/performance_mean",
        "entropy",
        "hpt/kept_rows/entropy",
        "completions/mean_length",
    ]


def test_find_trainer_state_prefers_output_dir_then_latest_checkpoint(tmp_path):
    write_state(tmp_path / "checkpoint-9", [])
    latest = write_state(tmp_path / "checkpoint-10", [])  # numeric order, not lexical
    (tmp_path / "checkpoint-11").mkdir()  # a checkpoint being written, without state yet
    assert find_trainer_state(tmp_path) == latest
    assert find_trainer_state(latest) == latest
    assert find_trainer_state(tmp_path / "checkpoint-9") == tmp_path / "checkpoint-9" / "trainer_state.json"
    top = write_state(tmp_path, [])
    assert find_trainer_state(tmp_path) == top


def test_missing_state_has_a_clear_error(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="No trainer_state.json.*checkpoint-\\*.*save_state"):
        find_trainer_state(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plot_run(tmp_path / "nope")
    assert cli_main(["plot", str(tmp_path)]) == 1
    assert "No trainer_state.json" in capsys.readouterr().err


def test_plot_run_writes_one_png_per_metric_and_an_overview(tmp_path):
    state = write_state(tmp_path / "run" / "checkpoint-60", fake_log_history())
    paths = plot_run(tmp_path / "run")
    assert [p.rsplit("/", 1)[-1] for p in paths] == [*METRIC_FILES, OVERVIEW_FILE]
    assert all(p.startswith(str(tmp_path / "run" / "plots")) for p in paths)
    for path in paths:
        assert_real_png(path)
    # a trainer_state.json file and an explicit out dir
    assert plot_run(state, out_dir=tmp_path / "elsewhere")[0] == str(tmp_path / "elsewhere" / "sft_share.png")


def test_plot_run_skips_metrics_a_grpo_run_does_not_log(tmp_path):
    write_state(tmp_path, fake_log_history(hpt=False))
    names = [p.rsplit("/", 1)[-1] for p in plot_run(tmp_path, overview=False)]
    assert names == ["reward.png", "entropy.png", "completion_length.png"]
    with pytest.raises(ValueError, match="logs none of"):
        plot_run(tmp_path, metrics=("hpt/sft_fraction",))


def test_plot_training_dynamics_keeps_its_signature(tmp_path):
    path = plot_training_dynamics(fake_log_history(10), str(tmp_path / "dyn.png"), keys=("hpt/sft_fraction", "reward"))
    assert path == str(tmp_path / "dyn.png")
    assert_real_png(path)
    # a metric that was never logged gets an empty, labelled panel instead of an error
    assert_real_png(plot_training_dynamics(fake_log_history(5), str(tmp_path / "x.png"), keys=("not/logged",)), 1000)


def test_cli_plot_from_a_real_short_hpt_run(tmp_path, capsys):
    """A real HPTTrainer run (tiny model, toy task) writes trainer_state.json with its checkpoints; plot it."""
    tokenizer = build_tiny_tokenizer()
    args = HPTConfig(
        output_dir=str(tmp_path / "run"),
        num_generations=4,
        per_device_train_batch_size=16,  # 4 prompts x 4 rollouts
        max_completion_length=16,
        learning_rate=3e-3,
        max_steps=4,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        seed=0,
        disable_tqdm=True,
    )
    trainer = HPTTrainer(
        model=build_tiny_model(tokenizer),
        reward_funcs=toy_answer_reward,
        args=args,
        train_dataset=build_toy_math_dataset()["train"],
        processing_class=tokenizer,
    )
    trainer.train()
    assert find_trainer_state(tmp_path / "run") == tmp_path / "run" / "checkpoint-4" / "trainer_state.json"
    capsys.readouterr()

    assert cli_main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "plots")]) == 0
    captured = capsys.readouterr()
    printed = captured.out.split()
    assert "note: entropy.png not written: no step logged `entropy` (no step had a rollout in its loss" in captured.err
    history = json.loads((tmp_path / "run" / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    steps = [entry for entry in history if "hpt/sft_fraction" in entry]
    # From scratch every rollout fails, so every prompt is on SFT and no rollout is in the loss: the entropy of the
    # rollouts run is missing (None) at every step, not TRL's 0, and it is not plotted
    assert [entry["hpt/sft_fraction"] for entry in steps] == [1.0] * 4
    assert [entry["hpt/kept_rows/entropy"] for entry in steps] == [None] * 4 and "entropy" not in steps[0]
    plotted = [name for name in METRIC_FILES if name != "entropy.png"]
    assert printed == [str(tmp_path / "plots" / name) for name in [*plotted, OVERVIEW_FILE]]
    for path in printed:
        assert_real_png(path)
    for key in ("hpt/sft_fraction", "reward", "hpt/performance_mean", "completions/mean_length"):
        assert sum(key in entry for entry in history) == 4, key


def test_plot_says_which_metrics_no_step_logged_and_why(tmp_path, capsys):
    history = fake_log_history(10)
    for entry in history:  # skip_zero_loss_rows on: TRL's entropy is logged under hpt/kept_rows/entropy
        entry["hpt/kept_rows/entropy"] = entry.pop("entropy", None)
    write_state(tmp_path / "skipping", history)
    assert cli_main(["plot", str(tmp_path / "skipping")]) == 0
    captured = capsys.readouterr()
    assert captured.out.splitlines()[3].endswith("entropy_kept_rows.png")  # the PNG itself was written
    assert "note: entropy.png not written: no step logged `entropy` (skip_zero_loss_rows was on" in captured.err

    for entry in history:  # every step on SFT: no rollout in the loss, no entropy anywhere
        entry.pop("hpt/kept_rows/entropy", None)
    write_state(tmp_path / "all_sft", history)
    assert cli_main(["plot", str(tmp_path / "all_sft")]) == 0
    err = capsys.readouterr().err
    assert "note: entropy.png not written: no step logged `entropy` (no step had a rollout in its loss" in err
    assert "note: entropy_kept_rows.png not written" in err


def test_a_constant_series_is_labelled(tmp_path, capsys):
    import matplotlib.pyplot as plt

    from hpt_trl.plotting import _draw

    history = [{"step": step, "reward": 0.0, "hpt/sft_fraction": step / 10} for step in range(1, 11)]
    figure, axes = plt.subplots(1, 2)
    _draw(axes[0], *zip(*[(e["step"], e["reward"]) for e in history]), "reward")
    _draw(axes[1], *zip(*[(e["step"], e["hpt/sft_fraction"]) for e in history]), "hpt/sft_fraction")
    assert [t.get_text() for t in axes[0].texts] == ["constant: 0 at every logged step"]
    assert len(axes[1].texts) == 0  # a moving series has no note
    plt.close(figure)
    write_state(tmp_path, history)
    assert cli_main(["plot", str(tmp_path), "--metrics", "reward,hpt/sft_fraction"]) == 0
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert notes == ["note: reward.png: `reward` is 0 at every logged step."]
