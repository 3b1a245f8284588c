"""A toy math task for the offline quickstart: sums of three small numbers, solved step by step.

Each problem `a+b+c=?` comes with a step-by-step demonstration and a final answer after `#`, e.g.
`3+4=7;7+5=12;#12`. Every addition fact the held-out problems need also occurs in the training problems, so a model
that learns the procedure generalizes to the held-out split.
"""

import random
import re
from itertools import product

from datasets import Dataset, DatasetDict

ANSWER_PATTERN = re.compile(r"#(-?\d+)")


def _example(a: int, b: int, c: int, conversational: bool) -> dict:
    prompt = f"{a}+{b}+{c}="
    demonstration = f"{a}+{b}={a + b};{a + b}+{c}={a + b + c};#{a + b + c}"
    if conversational:
        return {
            "prompt": [{"role": "user", "content": prompt}],
            "completion": [{"role": "assistant", "content": demonstration}],
            "solution": str(a + b + c),
        }
    return {"prompt": prompt, "completion": demonstration, "solution": str(a + b + c)}


def build_toy_math_dataset(
    max_digit: int = 5, test_fraction: float = 0.2, seed: int = 0, conversational: bool = False
) -> DatasetDict:
    """
    Build the toy task with a fixed seed and a held-out split.

    Args:
        max_digit (`int`, *optional*, defaults to `5`):
            Operands are drawn from `1..max_digit`.
        test_fraction (`float`, *optional*, defaults to `0.2`):
            Share of the problems held out in the `"test"` split.
        seed (`int`, *optional*, defaults to `0`):
            Seed of the split.
        conversational (`bool`, *optional*, defaults to `False`):
            Return conversational prompts and demonstrations instead of plain text.

    Returns:
        [`~datasets.DatasetDict`] with `"train"` and `"test"` splits and columns `prompt`, `completion` (the
        demonstration) and `solution` (the final answer).
    """
    problems = list(product(range(1, max_digit + 1), repeat=3))
    random.Random(seed).shuffle(problems)
    num_test = int(len(problems) * test_fraction)
    splits = {"test": problems[:num_test], "train": problems[num_test:]}
    return DatasetDict(
        {name: Dataset.from_list([_example(*p, conversational) for p in rows]) for name, rows in splits.items()}
    )


def extract_answer(text: str) -> str | None:
    """Return the final answer (the number after the last `#`), or `None` if there is none."""
    matches = ANSWER_PATTERN.findall(text)
    return matches[-1] if matches else None


def toy_answer_reward(completions: list, solution: list[str], **kwargs) -> list[float]:
    """1.0 when the completion's final answer equals the solution, else 0.0 (a TRL reward function)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(extract_answer(text) == gold) for text, gold in zip(texts, solution)]


def prompt_text(prompt: str | list[dict]) -> str:
    """The text of a plain or conversational prompt (its last message)."""
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


def is_always_solved(prompt: str | list[dict]) -> bool:
    """Whether `half_solved_reward` scores this `a+...=` prompt 1: its first operand is even."""
    return int(prompt_text(prompt).split("+")[0]) % 2 == 0


def half_solved_reward(prompts: list, completions: list, **kwargs) -> list[float]:
    """1 for every rollout of an even-first-operand prompt, 0 for every rollout of an odd one.

    A reward with a known gate outcome, for tests and benchmarks: at `gamma=0` exactly the odd-first-operand prompts
    are gated, whatever the model writes.
    """
    return [1.0 if is_always_solved(prompt) else 0.0 for prompt in prompts]
