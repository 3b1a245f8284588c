"""Chain sums: the task family, the two solution styles, the splits and the partially skilled base model of
`benchmarks/learning_pretrained.py` (the learning benchmark in the paper's regime, issue 14).

**Task family.** `a+b+c=` with single-digit operands 1..9 (and, out of distribution, one more operand). The answer
is the number after the last `#`; `hpt_trl.toy_task.toy_answer_reward` scores it (1 if right, else 0).

**Two styles, both correct.**

- The base model's *own* style (what it is pretrained on): the running sums only, comma-separated, then the answer:
  `3+4+5=` -> `7,12#12`.
- The *teacher's* style (the demonstrations used in post-training, as from a stronger model that writes more): every
  addition written out, then the answer: `3+4+5=` -> `3+4=7;7+5=12;#12`, about twice as long, with other separators.
  A model that learns it from the demonstrations has to change its style; a model that keeps its own style is still
  scored right when its answer is right.

**The base model.** A small Llama (`hpt_trl.tiny`'s character tokenizer; sizes in `BaseRecipe`), pretrained from
random weights with a plain next-token loss on the completion, in its own style, on a *broad family* of chain sums:
`BaseRecipe.length_mix` sets the share of problems with 1, 2, 3 and 4 operands (operands uniform in 1..9). Short chains
dominate: two-operand facts (`a+b` with a, b <= 9) are learned well, while the facts that only three- and
four-operand chains need (a running sum of 10..27 plus a digit) are seen much less often, so after a short
pretraining the model solves a three-operand prompt reliably when its first two operands sum to 9 or less, sometimes
when the running sums stay small, and rarely or never otherwise: a base that "already solves some prompts and not
others". No problem of the validation, test or out-of-distribution splits is ever a pretraining problem (the
post-training prompts may be, as for a real base model that has seen similar data).

The recipe is seeded and the model cached under `~/.cache/hpt-trl/chain_sums/<recipe hash>/` (or `cache_dir`), with
`base_report.json` holding the spread of its performance on the post-training prompts.

**Splits** (`build_splits`, fixed seed): the 729 three-operand problems are shuffled and cut into `train` (the
post-training prompts), `validation` (only to choose learning rates), `test` (in distribution); `ood` holds
four-operand problems (one more step) that are in no other split.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import time
from itertools import product

from datasets import Dataset, DatasetDict

from hpt_trl.toy_task import toy_answer_reward

TASK_VERSION = 1


# --------------------------------------------------------------------------------------------------------------------
# Task family and styles
# --------------------------------------------------------------------------------------------------------------------


def prompt_of(operands) -> str:
    return "+".join(str(x) for x in operands) + "="


def own_style(operands) -> str:
    """The base model's own style: running sums, then the answer. `(3, 4, 5)` -> `7,12#12`."""
    sums, total = [], operands[0]
    for x in operands[1:]:
        total += x
        sums.append(str(total))
    if not sums:  # a single operand
        sums = [str(total)]
    return ",".join(sums) + f"#{total}"


def teacher_style(operands) -> str:
    """The teacher's style: every addition written out, then the answer. `(3, 4, 5)` -> `3+4=7;7+5=12;#12`."""
    steps, total = [], operands[0]
    for x in operands[1:]:
        steps.append(f"{total}+{x}={total + x}")
        total += x
    if not steps:
        steps = [f"{total}={total}"]
    return ";".join(steps) + f";#{total}"


def _row(operands, style=teacher_style) -> dict:
    return {"prompt": prompt_of(operands), "completion": style(operands), "solution": str(sum(operands))}


def build_splits(
    seed: int = 0, num_validation: int = 64, num_test: int = 128, num_ood: int = 128, max_train: int | None = None
) -> DatasetDict:
    """
    The post-training and evaluation splits, with teacher-style demonstrations in `completion`.

    `train`, `validation` and `test` partition the 729 problems `a+b+c=` (a, b, c in 1..9), shuffled with `seed`;
    `ood` holds `num_ood` four-operand problems (`a+b+c+d=`), drawn with `seed`. `max_train` caps `train` (smoke runs).
    """
    rng = random.Random(seed)
    problems = list(product(range(1, 10), repeat=3))
    rng.shuffle(problems)
    validation = problems[:num_validation]
    test = problems[num_validation : num_validation + num_test]
    train = problems[num_validation + num_test :]
    if max_train is not None:
        train = train[:max_train]
    four = list(product(range(1, 10), repeat=4))
    ood = rng.sample(four, num_ood)
    splits = {"train": train, "validation": validation, "test": test, "ood": ood}
    return DatasetDict({name: Dataset.from_list([_row(p) for p in rows]) for name, rows in splits.items()})


def held_out_prompts(splits: DatasetDict) -> set[str]:
    """Prompts that pretraining must never see (validation, test, out of distribution)."""
    return {p for name in ("validation", "test", "ood") for p in splits[name]["prompt"]}


# --------------------------------------------------------------------------------------------------------------------
# Base model: recipe, pretraining, cache
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BaseRecipe:
    """How the partially skilled base model is pretrained (every field enters the cache key)."""

    hidden_size: int = 64
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    intermediate_size: int = 256
    # share of pretraining problems with 1, 2, 3, 4 operands (operands uniform in 1..9)
    length_mix: tuple[float, ...] = (0.1, 0.6, 0.2, 0.1)
    # a problem whose answer is >= large_total is kept only with probability large_keep (the base's knowledge gap)
    large_total: int = 18
    large_keep: float = 0.0
    steps: int = 800
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 20
    seed: int = 0
    split_seed: int = 0
    task_version: int = TASK_VERSION

    def key(self) -> str:
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser(os.environ.get("HPT_TRL_CACHE", "~/.cache/hpt-trl")), "chain_sums")


def _pretraining_problem(rng: random.Random, recipe: BaseRecipe, forbidden: set[str]):
    while True:
        length = rng.choices(range(1, len(recipe.length_mix) + 1), weights=recipe.length_mix)[0]
        operands = tuple(rng.randint(1, 9) for _ in range(length))
        if sum(operands) >= recipe.large_total and rng.random() >= recipe.large_keep:
            continue
        if prompt_of(operands) not in forbidden:
            return operands


def pretrain_base(recipe: BaseRecipe, forbidden: set[str], log_every: int = 0):
    """Pretrain the base model from random weights in its own style; returns `(model, tokenizer)`."""
    import torch

    from hpt_trl.tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(
        tokenizer,
        hidden_size=recipe.hidden_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        intermediate_size=recipe.intermediate_size,
        seed=recipe.seed,
    )
    vocab = tokenizer.get_vocab()
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rng = random.Random(recipe.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.learning_rate, weight_decay=0.0)

    def lr_at(step):  # linear warm-up, cosine decay to 10%
        if step < recipe.warmup_steps:
            return (step + 1) / recipe.warmup_steps
        progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    model.train()
    for step in range(recipe.steps):
        rows = []
        for _ in range(recipe.batch_size):
            operands = _pretraining_problem(rng, recipe, forbidden)
            prompt = [vocab[c] for c in prompt_of(operands)]
            completion = [vocab[c] for c in own_style(operands)] + [eos]
            rows.append((prompt, completion))
        length = max(len(p) + len(c) for p, c in rows)
        input_ids = torch.full((len(rows), length), pad)
        labels = torch.full((len(rows), length), -100)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, (p, c) in enumerate(rows):
            ids = p + c
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, len(p) : len(ids)] = torch.tensor(c)
            mask[i, : len(ids)] = 1
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if log_every and (step + 1) % log_every == 0:
            print(f"  pretraining step {step + 1}/{recipe.steps}: loss {loss.item():.3f}", flush=True)
    model.eval()
    return model, tokenizer


# --------------------------------------------------------------------------------------------------------------------
# Evaluation: samples, performance spread, pass@k
# --------------------------------------------------------------------------------------------------------------------


def sample_correct(model, tokenizer, prompts, solutions, n: int, temperature: float = 1.0, seed: int = 0,
                   max_new_tokens: int = 32, batch_size: int = 512) -> list[list[float]]:  # fmt: skip
    """For each prompt, the 0/1 scores of `n` completions (greedy when `n == 0`, returning one score per prompt)."""
    import torch

    from hpt_trl.generation import generate_batched

    model.eval()
    if n == 0:
        kwargs = {"do_sample": False, "num_return_sequences": 1}
    else:
        kwargs = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0, "num_return_sequences": n}
    per_call = max(1, batch_size // max(1, n))
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        completions = generate_batched(model, tokenizer, list(prompts), per_call, max_new_tokens=max_new_tokens,
                                       **kwargs)  # fmt: skip
    return [toy_answer_reward(texts, [gold] * len(texts)) for texts, gold in zip(completions, solutions)]


def greedy_accuracy(model, tokenizer, dataset) -> float:
    scores = sample_correct(model, tokenizer, dataset["prompt"], dataset["solution"], n=0)
    return sum(s[0] for s in scores) / len(scores)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from `n` samples of which `c` are correct (Chen et al., 2021)."""
    if n - c < k:
        return 1.0
    return 1.0 - math.prod((n - c - i) / (n - i) for i in range(k))


def spread(scores: list[list[float]]) -> dict:
    """Performance spread of per-prompt sample scores: mean P, shares always / sometimes / never solved, histogram."""
    n = len(scores[0])
    successes = [int(sum(s)) for s in scores]
    total = len(scores)
    return {
        "n": n,
        "prompts": total,
        "mean_p": sum(successes) / (n * total),
        "always": sum(c == n for c in successes) / total,
        "sometimes": sum(0 < c < n for c in successes) / total,
        "never": sum(c == 0 for c in successes) / total,
        "histogram": [sum(c == i for c in successes) for i in range(n + 1)],
    }


SPREAD_BOUNDS = {"mean_p": (0.2, 0.6), "always": 0.15, "sometimes": 0.15, "never": 0.15}


def spread_problems(report: dict) -> list[str]:
    """What is out of the issue's bounds (empty when the base qualifies)."""
    problems = []
    low, high = SPREAD_BOUNDS["mean_p"]
    if not low <= report["mean_p"] <= high:
        problems.append(f"mean P {report['mean_p']:.3f} not in [{low}, {high}]")
    for name in ("always", "sometimes", "never"):
        if report[name] < SPREAD_BOUNDS[name]:
            problems.append(f"{name} solved {report[name]:.1%} < {SPREAD_BOUNDS[name]:.0%}")
    return problems


def base_report(model, tokenizer, splits: DatasetDict, n: int = 8, seed: int = 1234) -> dict:
    """The base model's spread on the post-training prompts at `n` samples, temperature 1, plus greedy accuracies."""
    train = splits["train"]
    report = spread(sample_correct(model, tokenizer, train["prompt"], train["solution"], n=n, seed=seed))
    report["greedy"] = {name: greedy_accuracy(model, tokenizer, splits[name]) for name in splits}
    # style of the base's own greedy completions on a few train prompts
    from hpt_trl.generation import generate_batched

    examples = generate_batched(model, tokenizer, train["prompt"][:4], 4, max_new_tokens=32, do_sample=False)
    report["greedy_examples"] = {p: texts[0] for p, texts in zip(train["prompt"][:4], examples)}
    report["problems"] = spread_problems(report)
    return report


def load_or_pretrain_base(recipe: BaseRecipe = BaseRecipe(), cache_dir: str | None = None, splits=None,
                          verbose: bool = True):  # fmt: skip
    """The cached base model for `recipe` (pretrained and cached on first use): `(model, tokenizer, report)`."""
    import torch
    from transformers import AutoTokenizer, LlamaForCausalLM

    splits = splits if splits is not None else build_splits(recipe.split_seed)
    folder = os.path.join(cache_dir or default_cache_dir(), recipe.key())
    report_path = os.path.join(folder, "base_report.json")
    if os.path.exists(report_path):
        model = LlamaForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        with open(report_path) as f:
            report = json.load(f)
        model.eval()
        return model, tokenizer, report
    start = time.time()
    with torch.random.fork_rng():
        torch.manual_seed(recipe.seed)
        model, tokenizer = pretrain_base(recipe, held_out_prompts(splits), log_every=100 if verbose else 0)
    seconds = time.time() - start
    report = base_report(model, tokenizer, splits)
    report.update(recipe=dataclasses.asdict(recipe), recipe_key=recipe.key(), pretraining_seconds=round(seconds, 1),
                  parameters=sum(p.numel() for p in model.parameters()))  # fmt: skip
    os.makedirs(folder, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    with open(report_path, "w") as f:  # written last: its presence marks a complete cache entry
        json.dump(report, f, indent=2)
    return model, tokenizer, report


def format_spread(report: dict) -> str:
    return (
        f"mean P {report['mean_p']:.3f}; always {report['always']:.1%}, sometimes {report['sometimes']:.1%}, never "
        f"{report['never']:.1%} of {report['prompts']} prompts (n={report['n']}, temperature 1); successes 0..{report['n']}"
        f" histogram {report['histogram']}"
    )
