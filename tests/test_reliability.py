"""Nothing lost, nothing silently wrong: each case either works or fails early with a message that names the culprit.

Table-driven: one parametrized test per group of cases, each checking the outcome and the message.
"""

import json
import threading
from pathlib import Path

import pytest

from hpt_trl import evaluation
from hpt_trl.rewards import VerifierPool, get_math_accuracy_reward

FIXTURES = Path(__file__).parent / "fixtures"
GSM8K, MATH500 = str(FIXTURES / "gsm8k.jsonl"), str(FIXTURES / "math500.jsonl")
NO_MODEL = "/nonexistent/model"  # loading it would fail: an argument error must come first


def never_called(prompts, num_samples):
    raise AssertionError("generation started before the arguments were checked")


def boxed(answer):
    """A generator answering `\\boxed{answer}` to every sample."""
    return lambda prompts, k: [[f"$\\boxed{{{answer}}}$"] * k for _ in prompts]


# --- `hpt-trl eval`: every option is checked before the model loads -------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        (["--benchmarks", "gsm8k,gsm9k"], "argument --benchmarks: unknown benchmark 'gsm9k'"),
        (["--limit", "0"], "argument --limit: must be a positive integer, got '0'"),
        (["--num-samples", "0"], "argument --num-samples: must be a positive integer, got '0'"),
        (["--batch-size", "0"], "argument --batch-size: must be a positive integer, got '0'"),
        (["--max-new-tokens", "-5"], "argument --max-new-tokens: must be a positive integer, got '-5'"),
        (["--temperature", "-1"], "argument --temperature: must be a number in [0, inf) (0 decodes greedily), got '-"),
        (["--temperature", "nan"], "argument --temperature: must be a number in [0, inf)"),
        (["--top-p", "0"], "argument --top-p: must be a number in (0, 1], got '0'"),
        (["--verifier-timeout", "0"], "argument --verifier-timeout: must be a number in (0, inf), got '0'"),
        (["--data-file", "missing.jsonl"], "argument --data-file: no such file: 'missing.jsonl'"),
        (["--benchmarks", GSM8K, "--data-file", GSM8K], "would all be reported as 'gsm8k'"),
    ],
    ids=[
        "unknown-benchmark",
        "limit-0",
        "num-samples-0",
        "batch-size-0",
        "max-new-tokens-negative",
        "negative-temperature",
        "nan-temperature",
        "top-p-0",
        "verifier-timeout-0",
        "missing-data-file",
        "duplicate-benchmark",
    ],
)
def test_eval_cli_rejects_bad_options_before_loading_the_model(tmp_path, capsys, options, message):
    with pytest.raises(SystemExit) as exit_info:
        evaluation.main(["--model", NO_MODEL, "--output-dir", str(tmp_path / "out"), *options])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"benchmarks": [GSM8K, "gsm9k"]}, r"Unknown benchmark 'gsm9k'"),
        ({"benchmarks": "gsm8k"}, r"`benchmarks` must be a list of names"),
        ({"benchmarks": [GSM8K, GSM8K]}, r"would all be reported as 'gsm8k'"),
        ({"benchmarks": [GSM8K, "BAD_SCHEMA"]}, r"benchmark '.*bad.jsonl': Cannot tell the schema .* \['question'\]"),
        ({"num_samples": 0}, r"`num_samples` must be a positive integer, got 0"),
        ({"limit": 0}, r"`limit` must be a positive integer, got 0"),
        ({"batch_size": 0}, r"`batch_size` must be a positive integer, got 0"),
        ({"temperature": -1.0}, r"`temperature` must be >= 0"),
        ({"top_p": 1.5}, r"`top_p` must be in \(0, 1\], got 1.5"),
    ],
    ids=[
        "unknown-benchmark",
        "string-benchmarks",
        "duplicate-benchmark",
        "unreadable-second-file",
        "num-samples-0",
        "limit-0",
        "batch-size-0",
        "negative-temperature",
        "top-p-above-1",
    ],
)
def test_evaluate_rejects_bad_arguments_before_generating(tmp_path, arguments, message):
    bad_schema = tmp_path / "bad.jsonl"
    bad_schema.write_text(json.dumps({"question": "1+1?"}) + "\n")
    if isinstance(arguments.get("benchmarks"), list):
        arguments["benchmarks"] = [str(bad_schema) if b == "BAD_SCHEMA" else b for b in arguments["benchmarks"]]
    kwargs = {"benchmarks": [GSM8K], "generator": never_called, "output_dir": str(tmp_path / "out"), **arguments}
    with pytest.raises(ValueError, match=message):
        evaluation.evaluate(**kwargs)
    assert not (tmp_path / "out").exists()


# --- `hpt-trl eval`: each finished benchmark is on disk before the next one starts ----------------------------------


def crash_on(benchmark, error):
    """A generator answering gsm8k's first problem (18) everywhere, which raises `error` on `benchmark`."""

    def generate(prompts, k):
        if any(benchmark in p for p in prompts):
            raise error
        return [["$\\boxed{18}$"] * k for _ in prompts]

    return generate


def wrong_count_on(benchmark):
    """A generator answering 18 everywhere, with one sample per prompt instead of k on `benchmark`."""

    def generate(prompts, k):
        return [["$\\boxed{18}$"] * (1 if any(benchmark in p for p in prompts) else k) for _ in prompts]

    return generate


# A phrase of the first prompt of each fixture
FIRST_GSM8K, FIRST_MATH500 = "Janet", "Convert the point"


@pytest.mark.parametrize(
    "generator, error, message, finished",
    [
        (crash_on(FIRST_MATH500, RuntimeError("CUDA out of memory")), RuntimeError, "CUDA out of memory", ["gsm8k"]),
        (wrong_count_on(FIRST_MATH500), ValueError, "must return 2 completions", ["gsm8k"]),
        (crash_on(FIRST_GSM8K, KeyboardInterrupt()), KeyboardInterrupt, None, []),
        (boxed(18), None, None, ["gsm8k", "math500"]),
    ],
    ids=["crash-in-benchmark-2", "bad-generator-in-benchmark-2", "interrupted-in-benchmark-1", "no-crash"],
)
def test_eval_writes_each_benchmark_as_soon_as_it_is_done(tmp_path, generator, error, message, finished):
    # A previous run's files in the same folder must not pass for this run's
    (tmp_path / "results.json").write_text(json.dumps({"benchmarks": {"old": {}}}))
    (tmp_path / "samples.jsonl").write_text(json.dumps({"benchmark": "old"}) + "\n")
    run = lambda: evaluation.evaluate(  # noqa: E731
        benchmarks=[GSM8K, MATH500], num_samples=2, limit=2, generator=generator, output_dir=str(tmp_path)
    )
    if error is None:
        returned = run()
    else:
        with pytest.raises(error, match=message):
            run()
    results = json.loads((tmp_path / "results.json").read_text())
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert list(results["benchmarks"]) == finished
    assert results.get("unfinished", []) == [b for b in ("gsm8k", "math500") if b not in finished]
    assert [s["benchmark"] for s in samples] == [b for b in finished for _ in range(2 * 2)]
    if "gsm8k" in finished:  # gsm8k's first problem is right on both samples, its second wrong
        assert results["benchmarks"]["gsm8k"]["avg_at_k"] == results["benchmarks"]["gsm8k"]["pass_at_k"] == 50.0
    if error is None:
        assert results == returned


# --- The verifier: what it could not decide is unscored (None), never a failure (0.0) -------------------------------

HUGE = r"\boxed{9^{9^{9^{9}}}}"  # 9^387420489: no verifier finishes this in seconds


def with_reward(completion, gold, **settings):
    """Score one item with a `MathAccuracyReward`; returns `(score, answer_parsed)`."""
    reward, logged = get_math_accuracy_reward(**settings), {}
    try:
        score = reward([completion], [gold], log_extra=logged.__setitem__)[0]
    finally:
        reward.close()
    return score, logged["answer_parsed"][0]


def with_pool(item, timeout=60.0, kill_after=None):
    """Verify one item in a one-worker `VerifierPool`, killing the worker after `kill_after` seconds if set."""
    pool = VerifierPool(num_workers=1, timeout=timeout)
    try:
        pool.map([(r"\boxed{1}", r"\boxed{1}", False, None)])  # start the worker outside the timed part
        if kill_after is not None:
            threading.Timer(kill_after, pool._workers[0].proc.kill).start()
        score, _, answer = pool.map([item])[0]
        assert pool.map([(r"\boxed{5}", r"\boxed{5}", False, None)])[0][0] == 1.0  # a working worker took its place
    finally:
        pool.close()
    return score, answer


@pytest.mark.parametrize(
    "verify, score, label",
    [
        (lambda: with_reward(r"$\boxed{4}$", "5", num_workers=1), 0.0, "[4, '4']"),  # checked and wrong: 0.0
        (lambda: with_reward(r"$\boxed{5}$", "", num_workers=1), None, "[skipped]"),  # unparseable gold
        (lambda: with_reward(HUGE, "5", num_workers=1, timeout=3.0), None, "[timeout]"),  # math-verify's own timeout
        (lambda: with_reward(HUGE, "5", num_workers=0, timeout=3.0), None, "[timeout]"),  # the same, verified inline
        (lambda: with_pool((HUGE, r"\boxed{5}", False, None), timeout=1.0), None, "[timeout]"),  # the pool's deadline
        (lambda: with_pool((HUGE, r"\boxed{5}", False, None), kill_after=1.0), None, "[crashed]"),  # worker died
        (lambda: with_pool((r"\boxed{5}",)), None, "[error]"),  # the verifier raised
    ],
    ids=["wrong", "unparseable-gold", "math-verify-timeout", "inline-timeout", "deadline", "dead-worker", "error"],
)
def test_verifier_leaves_what_it_cannot_decide_unscored(verify, score, label):
    assert verify() == (score, label)
