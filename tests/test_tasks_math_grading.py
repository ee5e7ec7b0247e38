"""Math verifiers on real answer pairs: HF math-verify (the default) vs our regex checker.

``FIXTURES`` holds (case, response, truth, is it right?) pairs of the kinds RL math data
produces. Each verifier must agree with the truth column except on the cases pinned in its
``*_MISSES`` set, where it must still be wrong (so a fix shows up as a failing test, and the
table in docs/trainer.md gets updated). ``python -m pytest -s tests/test_tasks_math_grading.py
-k table`` prints the disagreement table.

Threads: math-verify 0.9.0's own timeouts use ``signal.alarm`` and fail off the main thread;
``tasks.math_grading`` bounds each call with ``tasks.deadline`` instead. The thread tests run the
whole fixture set from worker threads and interrupt a verification that would run for minutes.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from sapo_megatron.tasks import build_task, math_reward, resolve_verifier
from sapo_megatron.tasks.deadline import DeadlineExceeded, deadline
from sapo_megatron.tasks.math_grading import VERIFIERS, math_verify_available

needs_math_verify = pytest.mark.skipif(not math_verify_available(),
                                       reason="math-verify is not installed (pip install -e '.[math]')")

FIXTURES = [
    ("sqrt-frac vs slash", r"So the answer is $\boxed{\sqrt{2}/2}$.", r"\frac{\sqrt2}{2}", True),
    ("sqrt-frac vs 1/sqrt2", r"Hence $\boxed{\frac{1}{\sqrt{2}}}$", r"\frac{\sqrt2}{2}", True),
    ("decimal vs short frac", r"The answer is $\boxed{0.5}$", r"\frac12", True),
    ("short frac vs decimal", r"The answer is $\boxed{\frac12}$", "0.5", True),
    ("dfrac vs decimal", r"$\boxed{\dfrac{3}{4}}$", "0.75", True),
    ("half-open interval", r"The solution set is $\boxed{[1, 3)}$.", "[1,3)", True),
    ("interval to infinity", r"$x \in \boxed{(-\infty, 2]}$", r"(-\infty,2]", True),
    ("interval union", r"$\boxed{(-\infty,-1)\cup(1,\infty)}$", r"(-\infty,-1)\cup(1,\infty)", True),
    ("interval with left/right", r"$\boxed{\left[ 0, \frac{1}{2} \right]}$", r"[0,\frac12]", True),
    ("nested boxed", r"$\boxed{\boxed{\frac{\sqrt{3}}{2}}}$", r"\frac{\sqrt{3}}{2}", True),
    ("boxed with a sentence inside", r"$\boxed{\text{the answer is } 7}$", "7", True),
    ("last boxed wins", r"first $\boxed{1}$, then corrected: $\boxed{2}$", "2", True),
    ("units: cm", r"The side is $\boxed{10\text{ cm}}$.", "10", True),
    ("units: degrees", r"$\boxed{90^\circ}$", "90", True),
    ("units: dollars", r"She pays $\boxed{\$1,200}$.", "1200", True),
    ("units: in the truth", r"$\boxed{10}$", r"10\text{ cm}", True),
    ("percent vs decimal", r"$\boxed{50\%}$", "0.5", True),
    ("thousands separator", "She has 1,000 marbles.\n#### 1,000", "1000", True),
    ("gsm8k ####", "4 boxes hold 24.\n#### 24", "24", True),
    ("Answer: (DAPO)", "blah\nAnswer: 34", "34", True),
    ("tuple", r"$\boxed{(1, 2)}$", "(1,2)", True),
    ("sqrt shorthand", r"$\boxed{\sqrt2}$", r"\sqrt{2}", True),
    ("simplified radical", r"$\boxed{3\sqrt{2}}$", r"\sqrt{18}", True),
    ("equivalent polynomial", r"$\boxed{2(x+1)}$", "2x+2", True),
    ("x = 5", r"$\boxed{x = 5}$", "5", True),
    ("word answer", r"The day is $\boxed{\text{Monday}}$", "Monday", True),
    ("choice letter", r"The answer is $\boxed{(C)}$", "C", True),
    # Wrong answers that look like the right one.
    ("wrong: digits swapped", r"$\boxed{24}$", "42", False),
    ("wrong: sign", r"$\boxed{-42}$", "42", False),
    ("wrong: 0.333 vs 1/3", r"$\boxed{0.333}$", r"\frac{1}{3}", False),
    ("wrong: sqrt dropped", r"$\boxed{2}$", r"\sqrt{2}", False),
    ("wrong: 2/sqrt2 vs sqrt2/2", r"$\boxed{\frac{2}{\sqrt{2}}}$", r"\frac{\sqrt2}{2}", False),
    ("wrong: open vs half-open", r"$\boxed{(1, 3)}$", "[1,3)", False),
    ("wrong: tuple order", r"$\boxed{(2, 1)}$", "(1,2)", False),
    ("wrong: decimal point", r"$\boxed{4.2}$", "42", False),
    ("wrong: 12 vs 1,2", r"$\boxed{12}$", "1,2", False),
    ("wrong: truncated box", r"so $\boxed{3", "3", False),
    ("wrong: no answer", "I am not sure.", "7", False),
    ("wrong: empty box", r"$\boxed{}$", "0", False),
    ("wrong: variable case", r"$\boxed{X}$", "x", False),
    ("wrong: 5x vs 5", r"$\boxed{5x}$", "5", False),
]

# Where each verifier is wrong today (docs/trainer.md, "Math verifiers", lists the same).
MATH_VERIFY_MISSES = {
    "boxed with a sentence inside",  # reads the words as a product of symbols
    "wrong: variable case",  # lower-cases variables: X == x
}
REGEX_MISSES = {
    "sqrt-frac vs slash",  # no algebra: (sqrt2)/(2) is not sqrt2/2 as strings
    "sqrt-frac vs 1/sqrt2",
    "boxed with a sentence inside",
    "simplified radical",
    "equivalent polynomial",
    "wrong: truncated box",  # an unclosed box falls back to the last number, 3
}
MISSES = {"math_verify": MATH_VERIFY_MISSES, "regex": REGEX_MISSES}
IDS = [case for case, *_ in FIXTURES]


def verdicts(verifier: str) -> dict[str, bool]:
    fn = VERIFIERS[verifier]
    return {case: fn(response, truth, 5.0) for case, response, truth, _ in FIXTURES}


def test_fixture_names_are_unique_and_misses_exist():
    assert len(set(IDS)) == len(IDS)
    assert (MATH_VERIFY_MISSES | REGEX_MISSES) <= set(IDS)
    # Not vacuous: both kinds of answer are present.
    assert {ok for *_, ok in FIXTURES} == {True, False}


@pytest.mark.parametrize("verifier", ["regex", pytest.param("math_verify", marks=needs_math_verify)])
@pytest.mark.parametrize("case, response, truth, correct", FIXTURES, ids=IDS)
def test_verifier_on_fixture(verifier, case, response, truth, correct):
    got = VERIFIERS[verifier](response, truth, 5.0)
    if case in MISSES[verifier]:
        assert got is not correct, f"{verifier} now gets {case!r} right: drop it from its misses and the docs"
    else:
        assert got is correct


@needs_math_verify
def test_disagreement_table():
    """The cases where the two verifiers differ: exactly the misses of one and not the other."""
    hf, rx = verdicts("math_verify"), verdicts("regex")
    differ = sorted(case for case in IDS if hf[case] != rx[case])
    assert set(differ) == MATH_VERIFY_MISSES ^ REGEX_MISSES
    truth = {case: ok for case, *_, ok in FIXTURES}
    rows = ["| case | right answer? | math-verify | regex |", "|---|---|---|---|"]
    rows += [f"| {c} | {truth[c]} | {hf[c]} | {rx[c]} |" for c in differ]
    print("\n" + "\n".join(rows))


def test_auto_picks_math_verify_when_installed():
    assert resolve_verifier("auto") == ("math_verify" if math_verify_available() else "regex")
    assert resolve_verifier("regex") == "regex"
    with pytest.raises(ValueError, match=r"unknown math verifier 'sympy'; known: \['auto', 'math_verify', 'regex'\]"):
        resolve_verifier("sympy")


def test_math_task_takes_a_verifier(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"question": "sqrt(2)/2?", "answer": "\\\\frac{\\\\sqrt2}{2}"}\n')
    response = r"$\boxed{\sqrt{2}/2}$"
    regex = build_task({"name": "math", "path": str(path), "tokenizer": "byte", "verifier": "regex"})
    prompt = next(regex.prompts(seed=0))
    assert regex.reward(prompt, [], response) == 0.0  # a REGEX_MISSES case
    if math_verify_available():
        auto = build_task({"name": "math", "path": str(path), "tokenizer": "byte"})
        assert auto.config.verifier == "math_verify" and auto.reward(prompt, [], response) == 1.0
    with pytest.raises(ValueError, match="task 'math': unknown math verifier 'nope'"):
        build_task({"name": "math", "path": str(path), "tokenizer": "byte", "verifier": "nope"})
    with pytest.raises(ValueError, match="verifier_timeout_s must be > 0, got 0"):
        build_task({"name": "math", "path": str(path), "tokenizer": "byte", "verifier_timeout_s": 0})


# ---------------------------------------------------------------------------------------------
# Threads and deadlines
# ---------------------------------------------------------------------------------------------


@needs_math_verify
def test_upstream_timeouts_fail_off_the_main_thread():
    """Why tasks.deadline exists: math-verify's own (signal) timeouts refuse worker threads."""
    import math_verify

    errors = []

    def call():
        try:
            math_verify.parse(r"$\boxed{1}$")
        except ValueError as err:
            errors.append(str(err))

    thread = threading.Thread(target=call)
    thread.start()
    thread.join()
    assert errors and "threaded environment" in errors[0], (
        "math-verify now times out in threads: tasks.math_grading could use its timeouts again")


@needs_math_verify
def test_math_verify_from_worker_threads_matches_the_main_thread():
    main = verdicts("math_verify")
    fn = VERIFIERS["math_verify"]

    def score(fixture):
        case, response, truth, _ = fixture
        assert threading.current_thread() is not threading.main_thread()
        return case, fn(response, truth, 5.0)

    with ThreadPoolExecutor(max_workers=4) as pool:
        threaded = dict(pool.map(score, FIXTURES))
    assert threaded == main
    assert sum(main.values()) > 10 and not all(main.values())  # real verdicts, both ways


def _busy(seconds: float) -> bool:
    """Pure-Python work for ``seconds``; True when it ran to the end (was not interrupted)."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass
    return True


@pytest.mark.parametrize("where", ["main", "worker"])
def test_deadline_interrupts_and_stays_quiet_after(where):
    result = {}

    def body():
        try:
            with deadline(0.2):
                result["finished"] = _busy(60)
        except DeadlineExceeded:
            result["interrupted"] = True
        with deadline(0.2):  # finishes in time: nothing is raised, now or later
            result["quick"] = 1 + 1
        result["after"] = _busy(0.5)

    if where == "main":
        body()
    else:
        thread = threading.Thread(target=body)
        thread.start()
        thread.join()
    assert result == {"interrupted": True, "quick": 2, "after": True}


def test_deadline_passes_other_errors_through_and_none_means_no_limit():
    with pytest.raises(KeyError):
        with deadline(5):
            {}["missing"]
    with deadline(None):
        assert _busy(0.05)


@needs_math_verify
def test_a_verification_past_its_deadline_scores_zero_in_a_worker(monkeypatch):
    import math_verify

    monkeypatch.setattr(math_verify, "verify", lambda *a, **k: _busy(60))
    out = {}
    thread = threading.Thread(target=lambda: out.update(r=math_reward(r"$\boxed{1}$", "1", timeout_s=0.2)))
    thread.start()
    thread.join()
    assert out == {"r": 0.0}


def test_auto_falls_back_to_regex_without_math_verify(monkeypatch):
    from sapo_megatron.tasks import math_grading

    monkeypatch.setattr(math_grading, "math_verify_available", lambda: False)
    assert resolve_verifier("auto") == "regex"
    with pytest.raises(ValueError, match=r"needs the math-verify package: pip install -e '.\[math\]'"):
        resolve_verifier("math_verify")
    # The fallback is the regex checker: wrong on a case math-verify gets right.
    assert math_reward(r"$\boxed{\sqrt{2}/2}$", r"\frac{\sqrt2}{2}") == 0.0
    assert math_reward(r"$\boxed{\frac12}$", "0.5") == 1.0
