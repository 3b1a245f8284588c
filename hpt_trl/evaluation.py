"""`hpt-trl eval`: sample k completions per problem and report avg@k and pass@k, verified with math-verify.

avg@k is the mean score over all k samples of all problems (the paper's metric); pass@k is the share of problems with at
least one correct sample. Both are in percent. A sample the verifier cannot score (a gold answer it cannot parse, a
timeout) counts as wrong and is counted under `unscored`, so a broken gold answer never inflates a score.

Nothing finished is lost: every argument and every benchmark is checked, and every benchmark loaded, before the model
loads, and each benchmark's results are written to the output as soon as it is scored.

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

# Benchmark name -> (dataset name in `hpt_trl.data.DATASETS`, split): the registry's datasets with a benchmark split
BENCHMARKS = {name: (name, info.benchmark_split) for name, info in data.DATASETS.items() if info.benchmark_split}

Generator = Callable[[list[str], int], list[list[str]]]


class TransformersGenerator:
    """Batched sampling with `transformers` `generate` (left padding, a progress bar; `hpt_trl.generation`).

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
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.temperature, self.top_p, self.max_new_tokens = temperature, top_p, max_new_tokens
        self.batch_size, self.add_special_tokens, self.seed = batch_size, add_special_tokens, seed

    def __call__(self, prompts: list[str], num_samples: int) -> list[list[str]]:
        import torch
        from tqdm.auto import tqdm

        from .generation import generate_batched

        torch.manual_seed(self.seed)
        sample = self.temperature > 0
        kwargs = {
            "do_sample": sample,
            "max_new_tokens": self.max_new_tokens,
            "pad_token_id": self.tokenizer.pad_token_id,
        }
        if sample:  # greedy decoding gives one sequence, repeated below
            kwargs.update(temperature=self.temperature, top_p=self.top_p, num_return_sequences=num_samples)
        with tqdm(total=len(prompts), desc="Generating", unit="prompt") as progress:
            outputs = generate_batched(
                self.model,
                self.tokenizer,
                prompts,
                self.batch_size,
                add_special_tokens=self.add_special_tokens,
                sort_by_length=True,  # similar lengths share a batch
                progress=progress,
                **kwargs,
            )
        return outputs if sample else [texts * num_samples for texts in outputs]


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


def benchmark_label(name: str) -> str:
    """The key of a benchmark in the results: its name, or a data file's name without its suffix."""
    return name if name in BENCHMARKS else Path(name).stem


def check_arguments(
    benchmarks: Sequence[str],
    num_samples: int = 1,
    temperature: float = 0.6,
    top_p: float = 0.95,
    max_new_tokens: int = 1024,
    limit: int | None = None,
    batch_size: int = 16,
    verifier_timeout: float = 5.0,
) -> None:
    """Raise a `ValueError` naming the first bad argument of [`evaluate`], before anything expensive runs."""
    if isinstance(benchmarks, str):
        raise ValueError(f"`benchmarks` must be a list of names, got the string {benchmarks!r}.")
    if not benchmarks:
        raise ValueError("`benchmarks` is empty: nothing to evaluate.")
    for name in benchmarks:
        if name not in BENCHMARKS and not os.path.exists(name):
            raise ValueError(f"Unknown benchmark {name!r}: use one of {sorted(BENCHMARKS)} or a path to a data file.")
    labels = [benchmark_label(name) for name in benchmarks]
    for label in labels:
        if labels.count(label) > 1:
            clash = [name for name in benchmarks if benchmark_label(name) == label]
            raise ValueError(f"Benchmarks {clash} would all be reported as {label!r}: give each a distinct name.")
    positive = {"num_samples": num_samples, "max_new_tokens": max_new_tokens, "batch_size": batch_size}
    positive |= {} if limit is None else {"limit": limit}
    for argument, value in positive.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{argument}` must be a positive integer, got {value!r}.")
    if not temperature >= 0:  # also NaN
        raise ValueError(f"`temperature` must be >= 0 (0 decodes greedily), got {temperature!r}.")
    if not 0 < top_p <= 1:
        raise ValueError(f"`top_p` must be in (0, 1], got {top_p!r}.")
    if not verifier_timeout > 0:
        raise ValueError(f"`verifier_timeout` must be > 0 seconds, got {verifier_timeout!r}.")


class EvalInputError(ValueError):
    """A benchmark or model that cannot be loaded; `hpt-trl eval` prints its message without a traceback."""


# A saved tokenizer has one of these (`PreTrainedTokenizerBase.save_pretrained`)
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


def load_tokenizer(model: str | os.PathLike):
    """The tokenizer of `model` (a folder or a Hub id), or an [`EvalInputError`] naming the folder that has none."""
    from transformers import AutoTokenizer

    if os.path.isdir(model) and not any(os.path.isfile(os.path.join(model, f)) for f in TOKENIZER_FILES):
        raise EvalInputError(
            f"{str(model)!r} has no tokenizer (no {' or '.join(TOKENIZER_FILES)}): save it next to the model with "
            "`tokenizer.save_pretrained(...)` (`hpt-trl train` saves it in output_dir and in every checkpoint)."
        )
    try:
        return AutoTokenizer.from_pretrained(model)
    except (OSError, ValueError) as error:
        raise EvalInputError(f"Cannot load the tokenizer of {str(model)!r}: {error}") from error


def load_benchmark(name: str, template: str = "simple", limit: int | None = None):
    """Load a benchmark in conversational HPT form: a name of `BENCHMARKS`, or a local data file (any schema that
    `hpt_trl.data.detect_schema` knows, e.g. `prompt`/`solution` rows, whose prompts are kept as they are)."""
    if name in BENCHMARKS:
        dataset_name, split = BENCHMARKS[name]
        return data.DATASETS[dataset_name].loader(split, conversational=True, template=template, limit=limit)
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
            `None`. Both are written after each benchmark; until the last one is done, `results.json` lists the
            benchmarks still to come under `"unfinished"`.
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

    Raises:
        `ValueError`: naming the argument, for an unknown benchmark, two benchmarks with the same name, a `num_samples`,
        `max_new_tokens`, `batch_size` or `limit` below 1, a negative `temperature`, or a `top_p` outside (0, 1]; all
        before the model loads.
        `EvalInputError` (a `ValueError`): naming the benchmark or file that cannot be loaded (an empty data file, ...)
        or the model folder without a tokenizer, before the model loads; `hpt-trl eval` prints it and exits 1.
    """
    check_arguments(benchmarks, num_samples, temperature, top_p, max_new_tokens, limit, batch_size, verifier_timeout)
    if model is None and generator is None:
        raise ValueError("Pass a `model` or a `generator`.")
    # Cheap work first: every benchmark loads (a bad file fails here) before the model does
    template = data.template_for_model(model) if template == "auto" else template
    datasets = {}
    for name in benchmarks:
        try:
            datasets[benchmark_label(name)] = load_benchmark(name, template, limit)
        except (ValueError, KeyError, OSError) as error:
            raise EvalInputError(f"Cannot load benchmark {name!r}: {error}") from error
    if output_dir is not None:
        os.makedirs(output_dir, exist_ok=True)

    if tokenizer is None and model is not None:
        tokenizer = load_tokenizer(model)
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
    if output_dir is not None:  # replace a previous run's files at once, so they never pass for this run's
        _write_results(output_dir, results, unfinished=list(datasets))
        open(os.path.join(output_dir, "samples.jsonl"), "w").close()
    reward = get_math_accuracy_reward(timeout=verifier_timeout)
    try:
        for label, dataset in datasets.items():
            prompts = [render_prompt(p, tokenizer if chat else None) for p in dataset["prompt"]]
            completions = generator(prompts, num_samples)
            if len(completions) != len(prompts) or any(len(c) != num_samples for c in completions):
                raise ValueError(
                    f"The generator must return {num_samples} completions for each of {len(prompts)} prompts."
                )
            golds = [sol for sol, group in zip(dataset["solution"], completions) for _ in group]
            scores = reward([c for group in completions for c in group], golds)
            correct = [[scores[i * num_samples + j] == 1.0 for j in range(num_samples)] for i in range(len(prompts))]
            n = max(len(prompts), 1)
            results["benchmarks"][label] = {
                "num_problems": len(prompts),
                "num_samples": num_samples,
                "avg_at_k": 100.0 * sum(map(sum, correct)) / (n * num_samples),
                "pass_at_k": 100.0 * sum(map(any, correct)) / n,
                "unscored": sum(s is None for s in scores),
            }
            if output_dir is None:
                continue
            # This benchmark is done: its samples and results reach the disk before the next one starts
            with open(os.path.join(output_dir, "samples.jsonl"), "a") as f:
                for i, (prompt, gold, group) in enumerate(zip(prompts, dataset["solution"], completions)):
                    for j, completion in enumerate(group):
                        sample = {"benchmark": label, "problem": i, "sample": j, "prompt": prompt, "solution": gold,
                                  "completion": completion, "score": scores[i * num_samples + j]}  # fmt: skip
                        f.write(json.dumps(sample) + "\n")
            _write_results(output_dir, results, unfinished=[b for b in datasets if b not in results["benchmarks"]])
    finally:
        reward.close()
    return results


def _write_results(output_dir: str, results: dict, unfinished: list[str]) -> None:
    """Write `results.json` atomically; while benchmarks remain, it lists them under `"unfinished"`."""
    path = os.path.join(output_dir, "results.json")
    with open(path + ".tmp", "w") as f:
        json.dump({**results, "unfinished": unfinished} if unfinished else results, f, indent=2)
    os.replace(path + ".tmp", path)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def _bounded_float(low: float, high: float = float("inf"), low_inclusive: bool = True, hint: str = ""):
    """An argparse type: a float in the interval from `low` to `high` (`high` included)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not ((low <= value if low_inclusive else low < value) and value <= high):  # NaN fails too
            interval = f"{'[' if low_inclusive else '('}{low:g}, {high:g}{']' if high < float('inf') else ')'}"
            raise argparse.ArgumentTypeError(f"must be a number in {interval}{hint}, got {text!r}")
        return value

    return parse


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
        help="A jsonl/json/parquet/csv file to evaluate on (any schema of hpt_trl.data, e.g. prompt/solution rows); "
        "repeatable.",
    )
    parser.add_argument("--num-samples", type=_positive_int, default=1, help="k: samples per problem (default 1).")
    parser.add_argument(
        "--temperature",
        type=_bounded_float(0.0, hint=" (0 decodes greedily)"),
        default=0.6,
        help="Sampling temperature (default 0.6).",
    )
    parser.add_argument(
        "--top-p", type=_bounded_float(0.0, 1.0, False), default=0.95, help="Nucleus sampling threshold (default 0.95)."
    )
    parser.add_argument("--greedy", action="store_true", help="Greedy decoding (temperature 0).")
    parser.add_argument(
        "--max-new-tokens", type=_positive_int, default=1024, help="Most tokens per sample (default 1024)."
    )
    parser.add_argument(
        "--limit", type=_positive_int, default=None, help="Only the first LIMIT problems of each benchmark."
    )
    parser.add_argument("--output-dir", default="eval_results", help="Where results.json and samples.jsonl go.")
    parser.add_argument("--template", default="auto", choices=["auto", *data.TEMPLATES], help="Prompt template.")
    parser.add_argument("--backend", default="auto", choices=["auto", "vllm", "transformers"])
    parser.add_argument("--batch-size", type=_positive_int, default=16, help="Prompts per batch with transformers.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--verifier-timeout",
        type=_bounded_float(0.0, low_inclusive=False),
        default=5.0,
        help="Seconds to verify one sample.",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `hpt-trl eval`: prints a markdown table on stdout and writes `results.json` and `samples.jsonl`
    to `--output-dir`. Returns the exit status `0`. Bad arguments exit with status 2 and a message naming the option,
    before the model loads."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.benchmarks is None:
        args.benchmarks = "" if args.data_file else "gsm8k,math500"
    named = [b.strip() for b in args.benchmarks.split(",") if b.strip()]
    if not named and not args.data_file:
        parser.error("nothing to evaluate: give --benchmarks or --data-file")
    for name in named:
        if name not in BENCHMARKS and not os.path.exists(name):
            parser.error(f"argument --benchmarks: unknown benchmark {name!r}: use one of {', '.join(BENCHMARKS)} or a "
                         "path to a data file")  # fmt: skip
    for name in args.data_file:
        if not os.path.exists(name):
            parser.error(f"argument --data-file: no such file: {name!r}")
    benchmarks = named + args.data_file
    try:  # what is left: two benchmarks with the same name
        check_arguments(benchmarks)
    except ValueError as error:
        parser.error(f"argument --benchmarks/--data-file: {error}")
    try:
        results = _evaluate_from_args(args, benchmarks)
    except EvalInputError as error:
        print(f"hpt-trl eval: error: {error}", file=sys.stderr)
        return 1
    print(format_table(results), flush=True)
    print(f"Wrote {os.path.join(args.output_dir, 'results.json')} and samples.jsonl", file=sys.stderr)
    return 0


def _evaluate_from_args(args: argparse.Namespace, benchmarks: list[str]) -> dict:
    return evaluate(
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


if __name__ == "__main__":
    sys.exit(main())
