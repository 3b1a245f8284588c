"""`hpt-trl quickstart`: HPT end to end on a toy math task, offline, on CPU, in a few minutes.

1. builds a tiny Llama model and a character-level tokenizer locally;
2. builds the toy task (sums of three numbers with step-by-step demonstrations, fixed seed, held-out split);
3. trains with HPT (the model starts at 0% accuracy, so the gate sends every prompt to SFT at first);
4. prints held-out accuracy before and after, and the SFT share over training;
5. saves the model and a PNG plot of the SFT share and reward per step.
"""

import argparse
import json
import os
import time

import torch
from transformers import PrinterCallback, TrainerCallback

from .generation import generate_batched
from .hpt_config import HPTConfig
from .hpt_trainer import HPTTrainer
from .plotting import plot_training_dynamics
from .provenance import provenance
from .tiny import build_tiny_model, build_tiny_tokenizer
from .toy_task import build_toy_math_dataset, toy_answer_reward


class CompactLogCallback(TrainerCallback):
    """Print one short line every `every` steps instead of the full metrics dict at each step."""

    def __init__(self, every: int):
        self.every = every

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "hpt/sft_fraction" in logs and state.global_step % self.every == 0:
            print(
                f"step {state.global_step:4d}  reward {logs['reward']:.3f}  SFT share {logs['hpt/sft_fraction']:.2f}  "
                f"SFT loss {logs.get('hpt/sft_loss', float('nan')):.3f}",
                flush=True,
            )


def greedy_accuracy(model, tokenizer, dataset, max_new_tokens: int = 24, batch_size: int = 64) -> float:
    """Share of `dataset` rows whose greedy completion has the right final answer (batches in the dataset's order)."""
    model.eval()
    completions = generate_batched(
        model, tokenizer, dataset["prompt"], batch_size, max_new_tokens=max_new_tokens, do_sample=False
    )
    return sum(toy_answer_reward([texts[0] for texts in completions], dataset["solution"])) / len(dataset)


def build_quickstart_setup(seed: int = 0):
    """The quickstart's tiny tokenizer, model (138k parameters, initialised with `seed`) and toy task (fixed split)."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, hidden_size=64, num_hidden_layers=2, intermediate_size=256, seed=seed)
    return tokenizer, model, build_toy_math_dataset(max_digit=6, seed=0)


def quickstart_config(output_dir: str, max_steps: int, learning_rate: float, seed: int, **overrides) -> HPTConfig:
    """The quickstart's training settings: 16 prompts x 4 rollouts per step, CPU; `overrides` are `HPTConfig` fields."""
    settings = dict(
        output_dir=output_dir,
        num_generations=4,
        per_device_train_batch_size=64,  # 16 prompts x 4 rollouts per step
        max_completion_length=24,
        temperature=1.0,
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        max_steps=max_steps,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        seed=seed,
        disable_tqdm=True,
    )
    return HPTConfig(**{**settings, **overrides})


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpt-trl quickstart",
        description=__doc__.splitlines()[0] + " It prints the held-out accuracy before and after training and the "
        "share of prompts trained with SFT; the model, trainer_state.json and a plot go to --output_dir.",
    )
    parser.add_argument(
        "--output-dir", default="hpt-quickstart",
        help="Folder for the trained model (final/), quickstart_results.json, trainer_state.json and "
        "training_dynamics.png (default: %(default)s).",
    )
    parser.add_argument(
        "--max-steps", type=int, default=600,
        help="Optimizer steps, each of 16 prompts x 4 rollouts (default: %(default)s; 2-8 minutes on one core).",
    )
    parser.add_argument(
        "--gamma", type=float, default=0.0,
        help="HPT's gate threshold: a prompt whose share of correct rollouts P is <= gamma is trained with SFT on its "
        "demonstration, otherwise with RL. 0: SFT only when all 4 rollouts fail; below 0: never SFT (pure RL); "
        "1: always SFT (default: %(default)s).",
    )
    parser.add_argument(
        "--learning-rate", type=float, default=3e-3, help="Constant learning rate (default: %(default)s)."
    )
    parser.add_argument(
        "--seed", type=int, default=0,
        help="Seed of the model's initialisation and of training; the toy task's split is fixed "
        "(default: %(default)s).",
    )  # fmt: skip
    return parser


def parse_args(argv):
    return build_parser().parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    start = time.time()

    tokenizer, model, dataset = build_quickstart_setup(args.seed)
    print(
        f"Tiny Llama: {sum(p.numel() for p in model.parameters()):,} parameters. Toy task: "
        f"{len(dataset['train'])} train / {len(dataset['test'])} held-out problems, e.g. "
        f"{dataset['train'][0]['prompt']!r} -> {dataset['train'][0]['completion']!r}"
    )
    accuracy_before = greedy_accuracy(model, tokenizer, dataset["test"])

    config = quickstart_config(
        args.output_dir, max_steps=args.max_steps, learning_rate=args.learning_rate, seed=args.seed, gamma=args.gamma
    )
    trainer = HPTTrainer(
        model=model,
        reward_funcs=toy_answer_reward,
        args=config,
        train_dataset=dataset["train"],
        processing_class=tokenizer,
        callbacks=[CompactLogCallback(every=max(1, args.max_steps // 15))],
    )
    trainer.remove_callback(PrinterCallback)
    trainer.train()
    accuracy_after = greedy_accuracy(trainer.model, tokenizer, dataset["test"])

    final_dir = os.path.join(args.output_dir, "final")
    trainer.save_state()  # trainer_state.json, for `hpt-trl plot OUTPUT_DIR`
    trainer.save_model(final_dir)
    tokenizer.save_pretrained(final_dir)
    plot_path = os.path.join(args.output_dir, "training_dynamics.png")
    plot_training_dynamics(trainer.state.log_history, plot_path, keys=("hpt/sft_fraction", "reward"))

    sft_share = [entry["hpt/sft_fraction"] for entry in trainer.state.log_history if "hpt/sft_fraction" in entry]
    tenth = max(1, len(sft_share) // 10)
    summary = {
        "heldout_accuracy_before": accuracy_before,
        "heldout_accuracy_after": accuracy_after,
        "sft_share_first_10pct_steps": sum(sft_share[:tenth]) / tenth,
        "sft_share_last_10pct_steps": sum(sft_share[-tenth:]) / tenth,
        "sft_share_mean": sum(sft_share) / len(sft_share),
        "steps": len(sft_share),
        "seconds": round(time.time() - start, 1),
    }
    with open(os.path.join(args.output_dir, "quickstart_results.json"), "w") as f:
        json.dump({**summary, "seed": args.seed, **provenance(), "sft_share_per_step": sft_share}, f, indent=2)

    print(
        f"\nHeld-out accuracy (greedy, {len(dataset['test'])} problems): "
        f"before {accuracy_before:.1%} -> after {accuracy_after:.1%}"
    )
    print(
        f"SFT share of prompts: first 10% of steps {summary['sft_share_first_10pct_steps']:.2f}, "
        f"last 10% {summary['sft_share_last_10pct_steps']:.2f}, mean {summary['sft_share_mean']:.2f}"
    )
    print(f"Model saved to {final_dir}, plot to {plot_path}, in {summary['seconds']} s.")
    return 0
