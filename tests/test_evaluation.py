import json
from pathlib import Path

import pytest

from hpt_trl import evaluation
from hpt_trl.data import read_local, to_hpt

FIXTURES = Path(__file__).parent / "fixtures"
DATA_FILES = [str(FIXTURES / "gsm8k.jsonl"), str(FIXTURES / "math500.jsonl"), str(FIXTURES / "openr1_math_46k.jsonl")]


def gold_by_problem():
    """Map each fixture prompt's user text to its gold answer, so scripted generators can answer."""
    golds = {}
    for path in DATA_FILES:
        for row in to_hpt(read_local(path), conversational=True):
            golds[row["prompt"][-1]["content"]] = row["solution"]
    return golds


def scripted(answer_for):
    """A generator that answers every sample of a prompt with `answer_for(gold, sample_index)`."""
    golds = gold_by_problem()

    def generate(prompts, num_samples):
        out = []
        for prompt in prompts:
            gold = next(g for problem, g in golds.items() if problem in prompt)
            out.append([f"Reasoning... the answer is $\\boxed{{{answer_for(gold, j)}}}$." for j in range(num_samples)])
        return out

    return generate


def test_scripted_gold_answers_score_100(tmp_path):
    results = evaluation.evaluate(
        benchmarks=DATA_FILES, num_samples=3, generator=scripted(lambda gold, j: gold), output_dir=str(tmp_path)
    )
    for name, result in results["benchmarks"].items():
        assert result["avg_at_k"] == 100.0 and result["pass_at_k"] == 100.0, name
        assert result["num_problems"] >= 3 and result["num_samples"] == 3 and result["unscored"] == 0
    assert json.loads((tmp_path / "results.json").read_text()) == results


def test_scripted_wrong_answers_score_0():
    results = evaluation.evaluate(benchmarks=DATA_FILES, num_samples=2, generator=scripted(lambda gold, j: "-12345"))
    assert all(r["avg_at_k"] == 0.0 and r["pass_at_k"] == 0.0 for r in results["benchmarks"].values())


def test_avg_at_k_and_pass_at_k_differ(tmp_path):
    # One correct sample out of four per problem: avg@4 = 25%, pass@4 = 100%.
    generator = scripted(lambda gold, j: gold if j == 0 else "-12345")
    results = evaluation.evaluate(
        benchmarks=[DATA_FILES[0]], num_samples=4, limit=2, generator=generator, output_dir=str(tmp_path)
    )
    assert results["benchmarks"]["gsm8k"] == {
        "num_problems": 2,
        "num_samples": 4,
        "avg_at_k": 25.0,
        "pass_at_k": 100.0,
        "unscored": 0,
    }
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 8 and [s["score"] for s in samples[:4]] == [1.0, 0.0, 0.0, 0.0]
    assert samples[0]["solution"] == "18" and "Janet" in samples[0]["prompt"]


def test_unparseable_gold_counts_as_wrong(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "What is 1+1?", "solution": ""}) + "\n")
    results = evaluation.evaluate(benchmarks=[str(path)], num_samples=2, generator=lambda p, k: [["\\boxed{2}"] * k])
    assert results["benchmarks"]["bad"] == {
        "num_problems": 1,
        "num_samples": 2,
        "avg_at_k": 0.0,
        "pass_at_k": 0.0,
        "unscored": 2,
    }


def test_generator_must_return_k_samples():
    with pytest.raises(ValueError, match="completions"):
        evaluation.evaluate(benchmarks=[DATA_FILES[0]], num_samples=2, generator=lambda p, k: [["x"]] * len(p))


def test_format_table():
    results = {
        "config": {"num_samples": 4},
        "benchmarks": {
            "gsm8k": {"num_problems": 2, "avg_at_k": 50.0, "pass_at_k": 100.0},
            "math500": {"num_problems": 2, "avg_at_k": 0.0, "pass_at_k": 0.0},
        },
    }
    assert evaluation.format_table(results).splitlines() == [
        "| benchmark | problems | avg@4 | pass@4 |",
        "| --- | ---: | ---: | ---: |",
        "| gsm8k | 2 | 50.00 | 100.00 |",
        "| math500 | 2 | 0.00 | 0.00 |",
        "| average | 4 | 25.00 | 50.00 |",
    ]


def test_cli_runs_on_the_tiny_model(tiny_model_dir, tmp_path, capsys):
    argv = ["--model", tiny_model_dir, "--num-samples", "2", "--temperature", "0.6", "--top-p", "0.95"]
    argv += ["--max-new-tokens", "8", "--limit", "2", "--output-dir", str(tmp_path), "--batch-size", "2"]
    argv += ["--data-file", DATA_FILES[0], "--data-file", DATA_FILES[1]]
    assert evaluation.main(argv) == 0
    table = capsys.readouterr().out
    assert (
        "| benchmark | problems | avg@2 | pass@2 |" in table and "| gsm8k | 2 |" in table and "| math500 | 2 |" in table
    )
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["config"]["backend"] == "transformers" and results["config"]["chat_template"] is True
    assert results["config"]["template"] == "simple"  # the paper's template for a LLaMA model
    assert set(results["benchmarks"]) == {"gsm8k", "math500"}
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 2 * 2
    assert all(s["score"] in (0.0, 1.0) and isinstance(s["completion"], str) for s in samples)
    assert samples[0]["prompt"].startswith("<|user|>") and samples[0]["prompt"].endswith("<|assistant|>")


def test_transformers_generator_greedy_repeats_one_sample(tiny_model_dir):
    generator = evaluation.TransformersGenerator(tiny_model_dir, temperature=0.0, max_new_tokens=5, batch_size=2)
    outputs = generator(["<|user|>1+1?<|end|>\n<|assistant|>", "<|user|>2+2 is?<|end|>\n<|assistant|>", "x"], 3)
    assert len(outputs) == 3 and all(len(o) == 3 and o[0] == o[1] == o[2] for o in outputs)
    sampled = evaluation.TransformersGenerator(tiny_model_dir, temperature=1.0, max_new_tokens=5)
    assert [len(o) for o in sampled(["a", "bb"], 2)] == [2, 2]


def test_one_generation_loop_for_eval_and_the_quickstart(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hpt_trl import generation, quickstart
    from hpt_trl.toy_task import build_toy_math_dataset

    model, tokenizer = (
        AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        AutoTokenizer.from_pretrained(tiny_model_dir),
    )
    prompts = ["1+2+3=", "4=", "10+20="]
    tokenizer.padding_side = "right"
    kwargs = {"max_new_tokens": 4, "do_sample": False}
    in_order = generation.generate_batched(model, tokenizer, prompts, 2, **kwargs)
    by_length = generation.generate_batched(model, tokenizer, prompts, 2, sort_by_length=True, **kwargs)
    assert tokenizer.padding_side == "right"  # restored
    assert len(in_order) == 3 and all(len(texts) == 1 for texts in in_order)
    assert in_order == by_length  # each prompt's completion is in its place, whatever the batches
    # `hpt-trl eval` and the quickstart's greedy accuracy both run this loop
    calls = []
    original = generation.generate_batched
    monkeypatch.setattr(generation, "generate_batched", lambda *a, **k: calls.append(k) or original(*a, **k))
    evaluation.TransformersGenerator(model, tokenizer, temperature=0.0, max_new_tokens=4)(prompts, 2)
    assert tokenizer.padding_side == "right"  # no longer left as "left" for the caller
    monkeypatch.setattr(quickstart, "generate_batched", generation.generate_batched)
    quickstart.greedy_accuracy(model, tokenizer, build_toy_math_dataset(max_digit=6, seed=0)["test"].select(range(3)))
    assert (
        len(calls) == 2
        and calls[0]["sort_by_length"]
        and "sort_by_length" not in calls[1]
        and calls[1]["do_sample"] is False
        and calls[1]["max_new_tokens"] == 24
    )
