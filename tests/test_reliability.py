"""Nothing lost, nothing silently wrong: each case either works or fails early with a message that names the culprit.

Table-driven: one parametrized test per group of cases, each checking the outcome and the message.
"""

import json
import threading
from pathlib import Path

import pytest

from hpt_trl import evaluation
from hpt_trl.rewards import get_math_accuracy_reward
from hpt_trl.verifier_pool import VerifierPool

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


# --- HPTConfig and HPTTrainer: bad settings and data fail at construction, naming the option, row or function --------

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"sft_loss_coef": NAN}, "`sft_loss_coef` must be a finite number >= 0.0, got nan"),
        ({"sft_loss_coef": INF}, "`sft_loss_coef` must be a finite number >= 0.0, got inf"),
        ({"sft_loss_coef": -0.5}, "`sft_loss_coef` must be a finite number >= 0.0, got -0.5"),
        ({"gate": "linear", "gate_linear_upper": INF}, "`gate_linear_upper` must be a finite number, got inf"),
        ({"reward_weights": [1.0, NAN]}, r"`reward_weights\[1\]` must be a finite number, got nan"),
        ({"gamma": -1.0, "gamma_off": 0.5}, "`gamma_off=0.5` with `gamma=-1.0` is contradictory"),
        ({"max_steps": 2.5}, "`max_steps` must be an integer, got 2.5"),
        ({"num_generations": 2.5}, "`num_generations` must be an integer, got 2.5"),
        ({"max_demonstration_length": 8.5}, "`max_demonstration_length` must be an integer, got 8.5"),
        ({"luffy_shaping_gamma": 0.0}, "`luffy_shaping_gamma` must be a finite number > 0.0"),
        ({"success_threshold": NAN}, "`success_threshold` must be a finite number"),
    ],
    ids=lambda value: str(value) if isinstance(value, dict) else "",
)
def test_config_rejects_values_that_train_silently_wrong(tmp_path, overrides, message):
    from hpt_trl import HPTConfig

    with pytest.raises(ValueError, match=message):
        HPTConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, **overrides)


def test_config_takes_whole_floats_from_yaml_as_integers(tmp_path):
    from hpt_trl import HPTConfig

    config = HPTConfig(
        output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=2, num_generations=2.0, max_steps=3.0,
        max_demonstration_length=8.0,
    )  # fmt: skip
    assert (config.num_generations, config.max_steps, config.max_demonstration_length) == (2, 3, 8)
    assert all(isinstance(v, int) for v in (config.num_generations, config.max_steps, config.max_demonstration_length))


def _trainer(tmp_path, dataset=None, reward=None, model=None, **overrides):
    from helpers import addition_dataset, mixed_reward, tiny_args

    from hpt_trl import HPTTrainer
    from hpt_trl.tiny import build_tiny_model, build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    return HPTTrainer(
        model=model if model is not None else build_tiny_model(tokenizer),
        reward_funcs=reward or mixed_reward,
        args=tiny_args(tmp_path, **{"max_steps": 1, **overrides}),
        train_dataset=addition_dataset() if dataset is None else dataset,
        processing_class=tokenizer,
    )


def _bad_row_5_stream():
    from datasets import Dataset

    rows = [{"prompt": f"{a}+1=", "completion": f"{a}+1={a + 1}"} for a in range(8)]
    rows[5]["completion"] = None
    return Dataset.from_list(rows).to_iterable_dataset()


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    from hpt_trl.tiny import build_tiny_tokenizer

    tokenizer = build_tiny_tokenizer()
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=16, n_layer=1, n_head=2)
    config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    return GPT2LMHeadModel(config)


def _demo_too_long():
    from datasets import Dataset

    return Dataset.from_list([{"prompt": "1+1=", "completion": "2" * 300}, {"prompt": "3+1=", "completion": "4"}])


def _nan_gate(performance):
    return performance, 1 - performance  # P is NaN for a prompt with no scored rollout


def _infinite_reward(prompts, completions, **kwargs):
    return [float("inf") if i == 3 else 0.0 for i in range(len(prompts))]


def _unscored_half(prompts, completions, **kwargs):
    return [None if int(p.split("+")[0]) % 2 else 0.0 for p in prompts]


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda p: _trainer(p, dataset=_empty()), "The train dataset is empty"),
        (lambda p: _trainer(p, model="./no/such/model"), r"The model path './no/such/model' does not exist"),
        (
            lambda p: _trainer(p, model="never/loaded", performance_reward="accuracy"),
            r"`performance_reward='accuracy'`",
        ),
    ],
    ids=["empty-dataset", "missing-model-path", "unknown-performance-reward-before-model-load"],
)
def test_trainer_rejects_bad_input_at_construction(tmp_path, build, message):
    with pytest.raises(ValueError, match=message):
        build(tmp_path)


def _empty():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [], "completion": []})


@pytest.mark.parametrize(
    "build, error, message",
    [
        (
            lambda p: _trainer(p, dataset=_bad_row_5_stream(), per_device_train_batch_size=4, max_steps=4),
            ValueError,
            r"Row 5 of the train dataset has an invalid demonstration in column 'completion': it is None",
        ),
        (
            lambda p: _trainer(p, dataset=_demo_too_long(), gamma=1.0, per_device_train_batch_size=4, model=_gpt2()),
            ValueError,
            r"A demonstration of 301 tokens after a prompt of 4 tokens exceeds the model's 64 learned positions",
        ),
        (
            lambda p: _trainer(p, reward=_unscored_half, gamma=0.0),
            ValueError,
            r"gate_function _nan_gate returned alpha=nan",
        ),
        (
            lambda p: _trainer(p, reward=_infinite_reward),
            ValueError,
            r"At step 0, reward function '_infinite_reward' returned inf for rollout 3",
        ),
    ],
    ids=["streamed-bad-row", "demonstration-past-position-limit", "nan-gate-function", "infinite-reward"],
)
def test_training_stops_with_a_named_cause(tmp_path, build, error, message):
    trainer = build(tmp_path)
    if "nan_gate" in message:
        trainer._gate_settings = type(trainer._gate_settings)(
            **{**trainer._gate_settings.__dict__, "gate_function": _nan_gate}
        )
    with pytest.raises(error, match=message):
        trainer.train()


def _extreme_reward_at_step_2(prompts, completions, **kwargs):
    _extreme_reward_at_step_2.calls += 1
    if _extreme_reward_at_step_2.calls < 2:
        return [float(len(c) % 2) for c in completions]
    return [3e38 * (len(c) % 2) for c in completions]  # finite, but the loss overflows to inf


def test_non_finite_gradient_stops_before_the_update_and_keeps_good_checkpoints(tmp_path):
    import torch
    from safetensors.torch import load_file

    _extreme_reward_at_step_2.calls = 0
    trainer = _trainer(
        tmp_path, reward=_extreme_reward_at_step_2, gamma=-1.0, max_steps=3, save_strategy="steps", save_steps=1,
        num_generations=4,
    )  # fmt: skip
    with pytest.raises(FloatingPointError, match=r"The gradient norm is (nan|inf) at optimizer step 2 .* last good"):
        trainer.train()
    assert (tmp_path / "checkpoint-1").is_dir() and not (tmp_path / "checkpoint-2").exists()
    assert all(torch.isfinite(t).all() for t in load_file(tmp_path / "checkpoint-1" / "model.safetensors").values())
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())  # the bad update never happened


@pytest.mark.parametrize("algorithm, gamma", [("grpo", 0.0), ("hpt", -1.0)])
def test_pure_rl_needs_no_demonstration_column(tmp_path, algorithm, gamma):
    from helpers import addition_dataset

    trainer = _trainer(
        tmp_path, dataset=addition_dataset().remove_columns("completion"), algorithm=algorithm, gamma=gamma
    )
    trainer.train()
    assert trainer.state.global_step == 1


def test_numpy_gamma(tmp_path):
    import numpy as np

    trainer = _trainer(tmp_path, gamma=np.float32(0.0))
    trainer.train()
    assert trainer.gate_history[0]["gated"].count(True) == 2


def test_allow_missing_demonstrations(tmp_path):
    from datasets import Dataset
    from helpers import half_solved_reward

    rows = [{"prompt": f"{a}+1=", "completion": None if a in (1, 3) else f"{a}+1={a + 1}"} for a in range(4)]
    with pytest.raises(ValueError, match="Row 1 .* it is None"):
        _trainer(tmp_path, dataset=Dataset.from_list(rows), reward=half_solved_reward)
    trainer = _trainer(
        tmp_path, dataset=Dataset.from_list(rows), reward=half_solved_reward, allow_missing_demonstrations=True
    )
    trainer.train()
    record = trainer.gate_history[0]
    # odd prompts (1, 3) are never solved but have no demonstration: they stay on RL, never gated
    assert record["gated"] == [False] * 4 and record["estimator"] == ["rl"] * 4
    assert [
        e["hpt/missing_demonstration_fraction"]
        for e in trainer.state.log_history
        if "hpt/missing_demonstration_fraction" in e
    ] == [0.5]
