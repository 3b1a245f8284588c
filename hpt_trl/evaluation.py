"""`hpt-trl eval`: sample k completions per problem and report avg@k and pass@k, verified with math-verify.

avg@k is the mean score over all k samples of all problems (the paper's metric); pass@k is the share of problems with at
least one correct sample. Both are in percent. A sample whose gold answer cannot be parsed counts as wrong (and is
counted under `unscored`), so a broken gold answer never inflates a score.

Generation uses vLLM when it is installed and a GPU is present, else batched `transformers` generation. Any callable
`generator(prompts: list[str], num_samples: int) -> list[list[str]]` can be passed instead (the tests script one).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from . import data
from .rewards import get_math_accuracy_reward

logger = logging.getLogger(__name__)

# Benchmark name -> (dataset name in `hpt_trl.data`, split)
BENCHMARKS = {"gsm8k": ("gsm8k", "test"), "math500": ("math500", "test"), "math": ("math", "test")}

Generator = Callable[[list[str], int], list[list[str]]]


class TransformersGenerator:
    """Batched sampling with `transformers` `generate` (left padding, a progress bar).

    Args:
        model (`str` or `PreTrainedModel`):
            A model, or the path or Hub id to load it from.
        tokenizer (`PreTrainedTokenizerBase` or `None`, *optional*):
            Its tokenizer; loaded from `model` when `None`.
        temperature (`float`, *optional*, defaults to `0.6`):
            Sampling temperature; `0` decodes greedily.
        top_p (`float`, *optional*, defaults to `0.95`):
            Nucleus sampling threshold.
        max_new_tokens (`int`, *optional*, defaults to `1024`):
            Most tokens generated per sample.
        batch_size (`int`, *optional*, defaults to `16`):
            Prompts per `generate` call (each gives `num_samples` sequences).
        add_special_tokens (`bool`, *optional*, defaults to `True`):
            Whether tokenizing the prompts adds special tokens (set `False` for chat-templated prompts).
        seed (`int`, *optional*, defaults to `0`):
            Random seed.
    """

    def __init__(
        self,
        model,
        tokenizer=None,
        temperature: float = 0.6,
        top_p: float = 0.95,
        max_new_tokens: int = 1024,
        batch_size: int = 16,
        add_special_tokens: bool = True,
        seed: int = 0,
    ):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if isinstance(model, (str, os.PathLike)):
            tokenizer = tokenizer or AutoTokenizer.from_pretrained(model)
            dtype = torch.bfloat16 if torch.cuda.is_available() else torch.float32
            model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype)
            model.to("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.batch_size, self.add_special_tokens, self.seed = batch_size, add_special_tokens, seed

    def __call__(self, prompts: list[str], num_samples: int) -> list[list[str]]:
        import torch
        from tqdm.auto import tqdm

        torch.manual_seed(self.seed)
        sample = self.temperature > 0
        kwargs = {
            "do_sample": sample,
            "max_new_tokens": self.max_new_tokens,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if sample:  # greedy decoding gives one sequence, repeated below
            kwargs.update(temperature=self.temperature, top_p=self.top_p, num_return_sequences=num_samples)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))  # similar lengths share a batch
        outputs: list[list[str]] = [[] for _ in prompts]
        with tqdm(total=len(prompts), desc="Generating", unit="prompt") as progress:
            for start in range(0, len(order), self.batch_size):
                batch = order[start : start + self.batch_size]
                encoded = self.tokenizer(
                    [prompts[i] for i in batch],
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=self.add_special_tokens,
                ).to(self.model.device)
                with torch.inference_mode():
                    sequences = self.model.generate(**encoded, **kwargs)
                texts = self.tokenizer.batch_decode(
                    sequences[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True
                )
                per_prompt = len(texts) // len(batch)
                for j, i in enumerate(batch):
                    chunk = texts[j * per_prompt : (j + 1) * per_prompt]
                    outputs[i] = chunk if sample else chunk * num_samples
                progress.update(len(batch))
        return outputs


class VLLMGenerator:
    """Sampling with vLLM (`pip install vllm`), which shows its own progress bar.

    Args:
        model (`str`):
            Path or Hub id of the model.
        temperature, top_p, max_new_tokens, add_special_tokens, seed:
            As in [`TransformersGenerator`].
        **llm_kwargs:
            Passed to `vllm.LLM` (for example `gpu_memory_utilization`, `max_model_len`).
    """

    def __init__(
        self,
        model: str,
        temperature: float = 0.6,
        top_p: float = 0.95,
        max_new_tokens: int = 1024,
        add_special_tokens: bool = True,
        seed: int = 0,
        **llm_kwargs,
    ):
        from vllm import LLM

        self.llm = LLM(model=str(model), seed=seed, **llm_kwargs)
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.add_special_tokens, self.seed = add_special_tokens, seed

    def __call__(self, prompts: list[str], num_samples: int) -> list[list[str]]:
        from vllm import SamplingParams

        sample = self.temperature > 0
        params = SamplingParams(
            n=num_samples if sample else 1,
            temperature=self.temperature if sample else 0.0,
            top_p=self.top_p if sample else 1.0,
            max_tokens=self.max_new_tokens,
            seed=self.seed,
        )
        tokenizer = self.llm.get_tokenizer()  # tokenize here so a chat template's BOS is not doubled
        inputs = [
            {"prompt_token_ids": tokenizer.encode(p, add_special_tokens=self.add_special_tokens)} for p in prompts
        ]
        results = self.llm.generate(inputs, params, use_tqdm=True)
        return [[o.text for o in r.outputs] * (1 if sample else num_samples) for r in results]


def load_benchmark(name: str, template: str = "simple", limit: int | None = None):
    """Load a benchmark in conversational HPT form: a name of `BENCHMARKS`, or a local data file (any schema that
    `hpt_trl.data.detect_schema` knows, e.g. `prompt`/`solution` rows, whose prompts are kept as they are)."""
    if name in BENCHMARKS:
        dataset_name, split = BENCHMARKS[name]
        return data.LOADERS[dataset_name](split, conversational=True, template=template, limit=limit)
    if not os.path.exists(name):
        raise ValueError(f"Unknown benchmark {name!r}: use one of {sorted(BENCHMARKS)} or a path to a data file.")
    dataset = data.read_local(name)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    return data.to_hpt(dataset, conversational=True, template=template)


def render_prompt(messages: list[dict[str, str]], tokenizer=None) -> str:
    """Render a conversational prompt with the tokenizer's chat template, or as plain text when there is none."""
    if tokenizer is not None and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return "\n\n".join(m["content"] for m in messages) + "\n"


def format_table(results: dict) -> str:
    """Markdown table of `results["benchmarks"]` (from [`evaluate`]), with an average row for several benchmarks."""
    k = results["config"]["num_samples"]
    rows = [(name, r["num_problems"], r["avg_at_k"], r["pass_at_k"]) for name, r in results["benchmarks"].items()]
    if len(rows) > 1:
        rows.append(("average", sum(r[1] for r in rows), *(sum(r[i] for r in rows) / len(rows) for i in (2, 3))))
    lines = [f"| benchmark | problems | avg@{k} | pass@{k} |", "| --- | ---: | ---: | ---: |"]
    lines += [f"| {name} | {n} | {avg:.2f} | {pass_:.2f} |" for name, n, avg, pass_ in rows]
    return "\n".join(lines)


def evaluate(
    model: str | None = None,
    benchmarks: Sequence[str] = ("gsm8k", "math500"),
    num_samples: int = 1,
    temperature: float = 0.6,
    top_p: float = 0.95,
    max_new_tokens: int = 1024,
    limit: int | None = None,
    output_dir: str | None = None,
    generator: Generator | None = None,
    tokenizer=None,
    template: str = "auto",
    backend: str = "auto",
    batch_size: int = 16,
    seed: int = 0,
    verifier_timeout: float = 5.0,
) -> dict:
    """Evaluate a model on math benchmarks with avg@k and pass@k.

    Args:
        model (`str` or `None`, *optional*):
            Path or Hub id of the model. May be `None` only with a `generator` (prompts are then plain text).
        benchmarks (`Sequence[str]`, *optional*, defaults to `("gsm8k", "math500")`):
            Names from `BENCHMARKS` and/or paths to data files.
        num_samples (`int`, *optional*, defaults to `1`):
            k, the samples per problem.
        temperature (`float`, *optional*, defaults to `0.6`):
            Sampling temperature; `0` is greedy (one sample, repeated k times).
        top_p (`float`, *optional*, defaults to `0.95`):
            Nucleus sampling threshold.
        max_new_tokens (`int`, *optional*, defaults to `1024`):
            Most tokens generated per sample.
        limit (`int` or `None`, *optional*):
            Evaluate only the first `limit` problems of each benchmark.
        output_dir (`str` or `None`, *optional*):
            Where to write `results.json` and `samples.jsonl` (every sample's text and score). Nothing is written when
            `None`.
        generator (`callable` or `None`, *optional*):
            `generator(prompts, num_samples) -> list[list[str]]`; built from `backend` when `None`.
        tokenizer (`PreTrainedTokenizerBase` or `None`, *optional*):
            Used for the chat template; loaded from `model` when `None` and `model` is set.
        template (`str`, *optional*, defaults to `"auto"`):
            The paper's prompt template (see `hpt_trl.data.make_prompt`); `"auto"` picks it from the model family.
        backend (`str`, *optional*, defaults to `"auto"`):
            `"vllm"`, `"transformers"`, or `"auto"` (vLLM when installed and a GPU is present).
        batch_size (`int`, *optional*, defaults to `16`):
            Prompts per batch with `transformers`.
        seed (`int`, *optional*, defaults to `0`):
            Random seed.
        verifier_timeout (`float`, *optional*, defaults to `5.0`):
            Seconds allowed to verify one sample.

    Returns:
        `dict`: `{"model", "config", "benchmarks": {name: {"num_problems", "num_samples", "avg_at_k", "pass_at_k",
        "unscored"}}}`, scores in percent.
    """
    if model is None and generator is None:
        raise ValueError("Pass a `model` or a `generator`.")
    if tokenizer is None and model is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(model)
    template = data.template_for_model(model) if template == "auto" else template
    chat = tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))
    if generator is None:
        use_vllm = backend == "vllm" or (backend == "auto" and importlib.util.find_spec("vllm") and _has_cuda())
        backend = "vllm" if use_vllm else "transformers"
        common = {"temperature": temperature, "top_p": top_p, "max_new_tokens": max_new_tokens, "seed": seed}
        if use_vllm:
            generator = VLLMGenerator(model, add_special_tokens=not chat, **common)
        else:
            generator = TransformersGenerator(
                model, tokenizer, batch_size=batch_size, add_special_tokens=not chat, **common
            )
    else:
        backend = "custom"

    config = {
        "num_samples": num_samples,
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_new_tokens,
        "limit": limit,
        "template": template,
        "chat_template": chat,
        "backend": backend,
        "seed": seed,
    }
    results = {"model": None if model is None else str(model), "config": config, "benchmarks": {}}
    samples = []
    reward = get_math_accuracy_reward(timeout=verifier_timeout)
    try:
        for name in benchmarks:
            dataset = load_benchmark(name, template, limit)
            prompts = [render_prompt(p, tokenizer if chat else None) for p in dataset["prompt"]]
            completions = generator(prompts, num_samples)
            if len(completions) != len(prompts) or any(len(c) != num_samples for c in completions):
                raise ValueError(
                    f"The generator must return {num_samples} completions for each of {len(prompts)} prompts."
                )
            golds = [sol for sol, group in zip(dataset["solution"], completions) for _ in group]
            scores = reward([c for group in completions for c in group], golds)
            label = Path(name).stem if name not in BENCHMARKS else name
            correct = [[scores[i * num_samples + j] == 1.0 for j in range(num_samples)] for i in range(len(prompts))]
            n = max(len(prompts), 1)
            results["benchmarks"][label] = {
                "num_problems": len(prompts),
                "num_samples": num_samples,
                "avg_at_k": 100.0 * sum(map(sum, correct)) / (n * num_samples),
                "pass_at_k": 100.0 * sum(map(any, correct)) / n,
                "unscored": sum(s is None for s in scores),
            }
            for i, (prompt, gold, group) in enumerate(zip(prompts, dataset["solution"], completions)):
                for j, completion in enumerate(group):
                    score = scores[i * num_samples + j]
                    samples.append(
                        {"benchmark": label, "problem": i, "sample": j, "prompt": prompt, "solution": gold,
                         "completion": completion, "score": score}
                    )  # fmt: skip
    finally:
        reward.close()

    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)
        with open(os.path.join(output_dir, "results.json"), "w") as f:
            json.dump(results, f, indent=2)
        with open(os.path.join(output_dir, "samples.jsonl"), "w") as f:
            f.writelines(json.dumps(s) + "\n" for s in samples)
    return results


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hpt-trl eval", description="Report avg@k and pass@k on math benchmarks, verified with math-verify."
    )
    parser.add_argument("--model", required=True, help="Path or Hub id of the model.")
    parser.add_argument(
        "--benchmarks",
        default=None,
        help=f"Comma-separated names ({', '.join(BENCHMARKS)}) or data files. Default: gsm8k,math500, or none when "
        "--data-file is given.",
    )
    parser.add_argument(
        "--data-file",
        action="append",
        default=[],
        help="A jsonl/json/parquet file to evaluate on (any schema of hpt_trl.data, e.g. prompt/solution rows); "
        "repeatable.",
    )
    parser.add_argument("--num-samples", type=int, default=1, help="k: samples per problem (default 1).")
    parser.add_argument("--temperature", type=float, default=0.6, help="Sampling temperature (default 0.6).")
    parser.add_argument("--top-p", type=float, default=0.95, help="Nucleus sampling threshold (default 0.95).")
    parser.add_argument("--greedy", action="store_true", help="Greedy decoding (temperature 0).")
    parser.add_argument("--max-new-tokens", type=int, default=1024, help="Most tokens per sample (default 1024).")
    parser.add_argument("--limit", type=int, default=None, help="Only the first LIMIT problems of each benchmark.")
    parser.add_argument("--output-dir", default="eval_results", help="Where results.json and samples.jsonl go.")
    parser.add_argument("--template", default="auto", choices=["auto", *data.TEMPLATES], help="Prompt template.")
    parser.add_argument("--backend", default="auto", choices=["auto", "vllm", "transformers"])
    parser.add_argument("--batch-size", type=int, default=16, help="Prompts per batch with transformers.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verifier-timeout", type=float, default=5.0, help="Seconds to verify one sample.")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `hpt-trl eval`: prints a markdown table on stdout and writes `results.json` and `samples.jsonl`
    to `--output-dir`. Returns the exit status `0`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.benchmarks is None:
        args.benchmarks = "" if args.data_file else "gsm8k,math500"
    benchmarks = [b.strip() for b in args.benchmarks.split(",") if b.strip()] + args.data_file
    if not benchmarks:
        parser.error("nothing to evaluate: give --benchmarks or --data-file")
    results = evaluate(
        model=args.model,
        benchmarks=benchmarks,
        num_samples=args.num_samples,
        temperature=0.0 if args.greedy else args.temperature,
        top_p=args.top_p,
        max_new_tokens=args.max_new_tokens,
        limit=args.limit,
        output_dir=args.output_dir,
        template=args.template,
        backend=args.backend,
        batch_size=args.batch_size,
        seed=args.seed,
        verifier_timeout=args.verifier_timeout,
    )
    print(format_table(results), flush=True)
    print(f"Wrote {os.path.join(args.output_dir, 'results.json')} and samples.jsonl", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
