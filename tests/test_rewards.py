import math
import pickle
import threading
import time

import pytest

from hpt_trl.rewards import (
    MathAccuracyReward,
    get_math_accuracy_reward,
    math_accuracy_reward,
    normalize_gold,
)
from hpt_trl.verifier_pool import VerifierPool


@pytest.fixture(scope="module")
def reward():
    reward = get_math_accuracy_reward(timeout=5.0, num_workers=2)
    yield reward
    reward.close()


def test_correct_wrong_and_conversational(reward):
    completions = [
        r"So the answer is $\boxed{\frac{1}{3}}$.",
        r"The answer is $\boxed{\frac{1}{2}}$.",
        [{"role": "assistant", "content": r"Thus $\boxed{72}$."}],
        "no boxed answer: 72",
    ]
    assert reward(completions, [r"\frac{1}{3}", r"\frac{1}{3}", "72", "72"]) == [1.0, 0.0, 1.0, 0.0]


def test_bare_gold_answers_are_boxed_before_parsing(reward):
    # Bare, math-verify reads `\left( 3, \frac{\pi}{2} \right)` as 3, and `p - q` not at all.
    completions = [r"$\boxed{(3, \frac{\pi}{2})}$", r"$\boxed{3}$", r"$\boxed{p-q}$", r"$\boxed{70000}$"]
    golds = [r"\left( 3, \frac{\pi}{2} \right)", r"\left( 3, \frac{\pi}{2} \right)", "p - q", "70,000"]
    assert reward(completions, golds) == [1.0, 0.0, 1.0, 1.0]


def test_normalize_gold():
    assert normalize_gold("72") == r"\boxed{72}"
    assert normalize_gold(r"\$18.90") == r"\boxed{\$18.90}"  # an escaped dollar is not math mode
    assert normalize_gold(r"so it is $\boxed{2}$") == r"so it is $\boxed{2}$"
    assert normalize_gold(["5"]) == r"\boxed{5}"
    assert normalize_gold("  ") is None and normalize_gold(None) is None


def test_shorthand_latex_is_accepted_unless_strict(reward):
    strict = get_math_accuracy_reward(num_workers=0, strict=True)  # exactly trl.rewards.accuracy_reward
    completions, golds = [r"$n = \boxed{\frac12}$", r"$\boxed{11\sqrt2}$"], [r"\frac12", r"11\sqrt2"]
    assert reward(completions, golds) == [1.0, 1.0]
    assert strict(completions, golds) == [0.0, 0.0]


def test_unparseable_gold_leaves_every_rollout_unscored(reward):
    # All rollouts of this prompt are unscored (None): TRL makes them NaN with zero advantage, and HPT's success rate
    # P over scored rollouts is NaN, so the prompt is not gated (it stays on RL). See docs/evaluation.md.
    scores = reward([r"\boxed{1}", r"\boxed{2}", "", r"\boxed{}"], ["", "", "", "  "])
    assert scores == [None, None, None, None]
    scored = [s for s in scores if s is not None]
    p = sum(scored) / len(scored) if scored else math.nan
    assert math.isnan(p)


def test_pathological_strings_off_the_main_thread(reward):
    completions = [
        r"\boxed{" + "{" * 3000 + "1" + "}" * 3000 + "}",  # deeply nested braces
        r"\boxed{" + r"\frac{1}{" * 40 + "2" + "}" * 40 + "}",
        r"\boxed{9^{9^{9^{9}}}}",  # huge numbers
        r"\boxed{10^{10^{100}}}",
        r"\boxed{" + "9" * 50_000 + "}",
        r"\boxed{" * 5000,  # unclosed
        "x" * 100_000 + r" so the answer is $\boxed{7}$",  # 100k characters
        r"$\boxed{5}$",
    ]
    out, logged = {}, {}

    def run():
        start = time.monotonic()
        out["scores"] = reward(completions, ["5"] * 6 + ["7", "5"], log_extra=logged.__setitem__)
        out["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=run)  # TRL disables math-verify's timeouts here
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the verifier hung"
    # Never a wrong 1.0; what timed out is unscored (None), never a failed rollout (0.0)
    timed_out = [answer == "[timeout]" for answer in logged["answer_parsed"]]
    assert out["scores"][:6] == [None if t else 0.0 for t in timed_out[:6]]
    assert timed_out[2] and out["scores"][6:] == [1.0, 1.0]  # 9^(9^(9^9)) cannot be decided in seconds
    assert out["seconds"] < 30


def test_a_hung_item_is_unscored_and_its_worker_is_replaced():
    pool = VerifierPool(num_workers=1, timeout=1.0)
    pool.map([(r"\boxed{1}", r"\boxed{1}", False, None)])  # start the worker outside the timed part
    # No math-verify timeout inside the worker (as off the main thread): only the deadline can stop the first item.
    items = [(r"\boxed{9^{9^{9^{9}}}}", r"\boxed{5}", False, None), (r"\boxed{5}", r"\boxed{5}", False, None)]
    out = {}
    thread = threading.Thread(target=lambda: out.update(results=pool.map(items), end=time.monotonic()))
    start = time.monotonic()
    thread.start()
    thread.join(timeout=60)
    try:
        assert not thread.is_alive(), "the deadline did not stop the worker"
    finally:
        pool.close()
    results = out["results"]
    assert [r[0] for r in results] == [None, 1.0]
    assert results[0][1] == "[timeout]" and pool.num_timeouts == 1
    assert out["end"] - start < 15  # the 1 s deadline, plus restarting one worker


def test_trl_integration_name_pickle_and_logging(reward):
    from trl.trainer.utils import get_callable_name

    # its own name: TRL's `accuracy_reward` is another function
    assert get_callable_name(math_accuracy_reward) == "math_accuracy_reward"
    assert isinstance(math_accuracy_reward, MathAccuracyReward) and math_accuracy_reward._pool is None  # lazy
    logged, metrics = {}, {}
    scores = reward(
        [[{"role": "assistant", "content": r"\boxed{2}"}]],
        ["2"],
        log_extra=logged.__setitem__,
        log_metric=metrics.__setitem__,
        trainer_state=None,
        prompts=["1+1?"],
    )
    assert scores == [1.0]
    assert logged["solution"] == ["2"] and logged["answer_parsed"][0].startswith("[2")
    assert metrics == {"math_accuracy_reward/timeouts": 0.0}
    clone = pickle.loads(pickle.dumps(reward))  # TRL may send reward functions to another process
    assert clone._pool is None and clone.timeout == reward.timeout
    assert clone([r"\boxed{3}"], ["3"]) == [1.0]
    clone.close()


def test_inline_mode():
    reward = get_math_accuracy_reward(num_workers=0)
    assert reward([r"\boxed{3}", r"\boxed{4}", "x"], ["3", "3", ""]) == [1.0, 0.0, None]
    with pytest.raises(ValueError):
        reward([r"\boxed{3}"], ["3", "4"])
