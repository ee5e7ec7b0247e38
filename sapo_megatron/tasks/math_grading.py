"""Math rewards: Hugging Face ``math-verify`` by default, our regex checker as the fallback.

Verifiers are a registry (name -> ``fn(response_text, answer, timeout_s) -> bool``):

- ``math_verify``: HF Math-Verify (``pip install -e ".[math]"``): extracts the last
  ``\\boxed{}`` / LaTeX / plain expression with its own rules, parses both sides to SymPy and
  compares them symbolically and numerically (``\\frac{\\sqrt2}{2} == \\sqrt{2}/2 == 1/\\sqrt2``,
  intervals, sets, matrices). The truth is wrapped in ``\\boxed{}`` so that a bare ``42`` or
  ``\\frac12`` is read whole. A truth it cannot parse (plain words such as ``Monday``, a
  multiple-choice letter) is graded by the regex checker instead: math-verify would score
  every response 0 on it.
- ``regex``: ``sapo_megatron.tasks.answer_check``: no SymPy, exact on numbers.
- ``auto`` (the default): ``math_verify`` when the package imports, else ``regex``.

Choose one per task with ``task.options.verifier=regex`` (or ``math_verify`` / ``auto``).
``docs/trainer.md`` lists where the two disagree on our fixture set
(``tests/test_tasks_math_grading.py`` prints the table).

Threads: math-verify runs with its ``signal.alarm`` timeouts off (they raise ``ValueError``
off the main thread in 0.9.0) and each call is bounded by :func:`~.deadline.deadline`
instead, so rewards can be scored in worker threads. A response that runs past the limit
scores 0, as math-verify itself does on its timeouts.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from typing import Callable

from .answer_check import answers_match, extract_answer
from .deadline import DeadlineExceeded, deadline

Verifier = Callable[[str, "str | None", float], bool]
VERIFIERS: dict[str, Verifier] = {}
DEFAULT_TIMEOUT_S = 5.0
logger = logging.getLogger(__name__)


def register_verifier(name: str) -> Callable[[Verifier], Verifier]:
    def decorator(fn: Verifier) -> Verifier:
        VERIFIERS[name] = fn
        return fn

    return decorator


def math_verify_available() -> bool:
    return importlib.util.find_spec("math_verify") is not None


def resolve_verifier(name: str = "auto") -> str:
    """``auto`` -> ``math_verify`` when installed, else ``regex``; any other name is checked."""
    if name == "auto":
        return "math_verify" if math_verify_available() else "regex"
    if name not in VERIFIERS:
        raise ValueError(f"unknown math verifier {name!r}; known: {['auto', *sorted(VERIFIERS)]}")
    if name == "math_verify" and not math_verify_available():
        raise ValueError("verifier 'math_verify' needs the math-verify package: pip install -e '.[math]' "
                         "(or pick verifier=regex)")
    return name


@register_verifier("regex")
def regex_verify(response_text: str, answer: str | None, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    return answers_match(extract_answer(response_text), answer)


@functools.lru_cache(maxsize=1)
def _math_verify():
    import math_verify

    # Our deadline replaces its timeouts; do not warn that they are off on every call.
    math_verify.utils.TIMEOUT_WARNING_SHOWN = True
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return math_verify


@functools.lru_cache(maxsize=4096)
def _parse_truth(answer: str):
    mv = _math_verify()
    text = answer if ("\\boxed" in answer or "$" in answer) else f"\\boxed{{{answer}}}"
    return mv.parse(text, parsing_timeout=None)


@register_verifier("math_verify")
def hf_math_verify(response_text: str, answer: str | None, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    if answer is None or not str(answer).strip():
        return False
    mv = _math_verify()
    try:
        with deadline(timeout_s):
            gold = _parse_truth(str(answer))
            if not gold:
                return regex_verify(response_text, answer)
            predicted = mv.parse(response_text, parsing_timeout=None)
            return bool(predicted) and mv.verify(gold, predicted, timeout_seconds=None)
    except DeadlineExceeded:
        logger.warning("math-verify ran past %.1f s on a response; scored 0", timeout_s)
        return False


def math_reward(response_text: str, answer: str | None, *, verifier: str = "auto",
                timeout_s: float = DEFAULT_TIMEOUT_S) -> float:
    """1.0 when the response's final answer equals ``answer`` under ``verifier``, else 0.0."""
    return 1.0 if VERIFIERS[resolve_verifier(verifier)](response_text, answer, timeout_s) else 0.0
