"""Arithmetic word problems: the task of `benchmarks/learning_smollm2.py` (issue 14, part 9, SmolLM2-135M-Instruct).

**Problems.** Generated from seeded templates, with small numbers:

- *one-step*: one operation, `+` or `-` on a start amount and a change (1..20), or `*` (boxes x items per box, 2..9):
  "Tom has 7 apples. He buys 5 more. How many apples does Tom have now?";
- *two-step*: two operations in a row, each `+` or `-` (1..20): "Anna has 12 cards. She sells 4, then she finds 9
  more. How many cards does Anna have now?".

Every answer and every intermediate result is a non-negative integer. Names, items and the wording of each action
("buys N more", "finds N more", "gets N more from a friend"; "gives N to a friend", "loses N", "sells N") vary.

**Demonstrations** (the `completion` column): one line per operation, ending with the answer sentence::

    Tom starts with 7 apples.
    He buys 5 more: 7 + 5 = 12.
    The answer is 12.

**Answer format and reward.** The answer is the first number after the first "answer is" (case-insensitive, an
optional colon or `$` in between, thousands commas allowed); `word_problem_reward` scores 1.0 when it equals the gold
answer, else 0.0 (no "answer is": 0.0). The *first* match counts, so a completion that lists several answers, or goes
on after its answer with a made-up next problem, is scored on the answer it gave first.

**Prompt** (`prompt_messages`): a 2-shot chat: a system message with the instruction, then two worked examples as
user/assistant turns (one one-step, one two-step, in the demonstrations' format), then the question as the last user
turn. The two examples' arithmetic (operations and numbers) is excluded from every split.

**Splits** (`build_splits`, fixed seed): `one_step` and `two_step` held-out sets are drawn first, then `train` (half
one-step, half two-step, in random order). A problem's *signature* is its operations and numbers (not its names or
wording); the splits share no signature, so no held-out problem is a renamed training problem.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re

NAMES = (
    ("Tom", "He"), ("Anna", "She"), ("Sam", "He"), ("Lily", "She"), ("Ben", "He"), ("Emma", "She"),
    ("Max", "He"), ("Zoe", "She"), ("Jack", "He"), ("Nora", "She"),
)  # fmt: skip
ITEMS = ("apples", "marbles", "stickers", "books", "pencils", "cards", "coins", "shells", "cookies", "stamps")
ACTIONS = {
    "+": ("buys {n} more", "finds {n} more", "gets {n} more from a friend"),
    "-": ("gives {n} to a friend", "loses {n}", "sells {n}"),
}
SYSTEM_PROMPT = (
    "Solve the math word problem step by step, one line per step. "
    'End with "The answer is N." where N is the final number.'
)
ANSWER_PATTERN = re.compile(r"answer is\s*:?\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)", re.IGNORECASE)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One word problem: `ops` ("+", "-" or "*"; one or two of them), `operands` (one more than `ops`), and its
    wording: who (`name`, `pronoun`), what (`items`) and which phrase each action uses (`phrases`)."""

    ops: tuple[str, ...]
    operands: tuple[int, ...]
    name: str = "Tom"
    pronoun: str = "He"
    items: str = "apples"
    phrases: tuple[int, ...] = (0, 0)

    @property
    def signature(self) -> tuple:
        return (self.ops, self.operands)

    @property
    def num_steps(self) -> int:
        return len(self.ops)

    def results(self) -> list[int]:
        """The running result after each operation (the last one is the answer)."""
        value, results = self.operands[0], []
        for op, x in zip(self.ops, self.operands[1:]):
            value = value + x if op == "+" else value - x if op == "-" else value * x
            results.append(value)
        return results

    @property
    def answer(self) -> int:
        return self.results()[-1]

    def _action(self, index: int) -> str:
        op, n = self.ops[index], self.operands[index + 1]
        return ACTIONS[op][self.phrases[index] % len(ACTIONS[op])].format(n=n)

    def question(self) -> str:
        if self.ops == ("*",):
            a, b = self.operands
            return (f"{self.name} buys {a} boxes of {self.items}. Each box has {b} {self.items}. "
                    f"How many {self.items} does {self.name} buy?")  # fmt: skip
        text = f"{self.name} has {self.operands[0]} {self.items}. {self.pronoun} {self._action(0)}"
        if self.num_steps == 2:
            text += f", then {self.pronoun.lower()} {self._action(1)}"
        return text + f". How many {self.items} does {self.name} have now?"

    def demonstration(self) -> str:
        if self.ops == ("*",):
            a, b = self.operands
            return (
                f"{self.name} buys {a} boxes with {b} {self.items} each: {a} * {b} = {a * b}.\nThe answer is {a * b}."
            )
        lines = [f"{self.name} starts with {self.operands[0]} {self.items}."]
        before = self.operands[0]
        for index, (op, x, after) in enumerate(zip(self.ops, self.operands[1:], self.results())):
            subject = self.pronoun if index == 0 else f"Then {self.pronoun.lower()}"
            lines.append(f"{subject} {self._action(index)}: {before} {op} {x} = {after}.")
            before = after
        return "\n".join(lines) + f"\nThe answer is {self.answer}."


# The prompt's two worked examples (excluded from every split)
EXAMPLES = (
    Problem(("+",), (6, 9), "Mia", "She", "shells", (1,)),
    Problem(("-", "+"), (14, 5, 8), "Leo", "He", "cards", (2, 0)),
)


def prompt_messages(problem: Problem) -> list[dict[str, str]]:
    """The 2-shot chat prompt: instruction, two worked examples as user/assistant turns, then the question."""
    messages = [{"role": "system", "content": SYSTEM_PROMPT}]
    for example in EXAMPLES:
        messages += [{"role": "user", "content": example.question()},
                     {"role": "assistant", "content": example.demonstration()}]  # fmt: skip
    return messages + [{"role": "user", "content": problem.question()}]


def row(problem: Problem) -> dict:
    """A dataset row: `prompt` (chat messages), `completion` (the demonstration as an assistant message),
    `solution` (the gold answer), `steps` and `question`."""
    return {
        "prompt": prompt_messages(problem),
        "completion": [{"role": "assistant", "content": problem.demonstration()}],
        "solution": str(problem.answer),
        "steps": problem.num_steps,
        "question": problem.question(),
    }


def sample_problem(rng: random.Random, num_steps: int) -> Problem:
    """A random problem with `num_steps` operations (one-step: `+`, `-` or `*`; two-step: `+`/`-` twice)."""
    name, pronoun = rng.choice(NAMES)
    items = rng.choice(ITEMS)
    phrases = (rng.randrange(3), rng.randrange(3))
    if num_steps == 1:
        op = rng.choice("+-*")
        if op == "*":
            return Problem(("*",), (rng.randint(2, 9), rng.randint(2, 9)), name, pronoun, items, phrases)
        ops = (op,)
    else:
        ops = (rng.choice("+-"), rng.choice("+-"))
    operands = [rng.randint(1, 20)]
    value = operands[0]
    for op in ops:
        if op == "-" and value == 0:
            return sample_problem(rng, num_steps)  # nothing left to take away: draw again
        x = rng.randint(1, 20) if op == "+" else rng.randint(1, min(value, 20))
        operands.append(x)
        value = value + x if op == "+" else value - x
    return Problem(ops, tuple(operands), name, pronoun, items, phrases)


def _draw(rng: random.Random, num_steps: int, count: int, taken: set) -> list[Problem]:
    problems, tries = [], 0
    while len(problems) < count:
        tries += 1
        if tries > 100 * count + 1000:
            raise ValueError(f"cannot draw {count} distinct {num_steps}-step problems outside the other splits")
        problem = sample_problem(rng, num_steps)
        if problem.signature not in taken:
            taken.add(problem.signature)
            problems.append(problem)
    return problems


def build_problem_splits(seed: int = 0, num_train: int = 400, num_one_step: int = 150,
                         num_two_step: int = 150) -> dict[str, list[Problem]]:  # fmt: skip
    """`one_step` and `two_step` held-out problems, then `train` (half one-step, half two-step, shuffled); no two
    problems (in or across splits, the prompt's examples included) share operations and numbers."""
    rng = random.Random(seed)
    taken = {example.signature for example in EXAMPLES}
    splits = {"one_step": _draw(rng, 1, num_one_step, taken), "two_step": _draw(rng, 2, num_two_step, taken)}
    train = _draw(rng, 1, num_train // 2, taken) + _draw(rng, 2, num_train - num_train // 2, taken)
    rng.shuffle(train)
    splits["train"] = train
    return splits


def build_splits(seed: int = 0, num_train: int = 400, num_one_step: int = 150, num_two_step: int = 150):
    """The splits of `build_problem_splits` as a `DatasetDict` of `row`s."""
    from datasets import Dataset, DatasetDict

    problems = build_problem_splits(seed, num_train, num_one_step, num_two_step)
    return DatasetDict({name: Dataset.from_list([row(p) for p in rows]) for name, rows in problems.items()})


def extract_answer(text: str) -> float | None:
    """The first number after the first "answer is" in `text`, or `None`."""
    match = ANSWER_PATTERN.search(text)
    if match is None:
        return None
    try:
        return float(match.group(1).replace(",", ""))
    except ValueError:
        return None


def word_problem_reward(completions: list, solution: list[str], **kwargs) -> list[float]:
    """1.0 when a completion's answer (`extract_answer`) equals the gold answer, else 0.0 (a TRL reward function)."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    scores = []
    for text, gold in zip(texts, solution):
        value = extract_answer(text)
        scores.append(float(value is not None and math.isclose(value, float(gold))))
    return scores


def binomial_se(p: float, n: int) -> float:
    """Standard error of an accuracy `p` measured on `n` independent problems: sqrt(p(1-p)/n)."""
    return math.sqrt(p * (1 - p) / n) if n else float("nan")


def paired_difference(first: str, second: str) -> tuple[float, float]:
    """Mean accuracy difference of two models scored on the same problems (`first`, `second`: one "0"/"1" per problem,
    in the same order) and its standard error sqrt(s^2/n), s^2 the sample variance of the per-problem differences.
    Pairing removes the problems' own difficulty from the noise, so it is smaller than two binomial errors combined."""
    if len(first) != len(second) or not first:
        raise ValueError(f"need two score strings of the same non-zero length, got {len(first)} and {len(second)}")
    differences = [int(a) - int(b) for a, b in zip(first, second)]
    n = len(differences)
    mean = sum(differences) / n
    variance = sum((d - mean) ** 2 for d in differences) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(variance / n)
