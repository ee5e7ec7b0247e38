"""Our own math answer checker (regular expressions + exact fractions): the fallback verifier.

The default verifier is Hugging Face's ``math-verify`` when it is installed (the ``[math]``
extra; see ``sapo_megatron.tasks.math_grading``). This module is what runs without it, and
what ``task.options.verifier=regex`` selects: no SymPy, no timeouts needed, exact on numbers.
It is named ``answer_check`` so that it is never confused with the ``math_verify`` package.

Extraction (first rule that finds something wins):
1. the last ``\\boxed{...}`` or ``\\fbox{...}`` (nested braces handled; ``\\boxed 5`` too);
2. the last ``#### x`` (GSM8K style);
3. the last ``answer is x`` / ``Answer: x`` / ``final answer: x`` (DAPO asks for ``Answer: x``),
   up to the end of that line or sentence;
4. the last number in the text (``-3``, ``1,000``, ``2.5``, ``3/4``).

Normalisation: strips ``$``, ``\\(...\\)``, ``\\left``/``\\right``, LaTeX spacing, ``\\text{}`` and
similar wrappers (keeping their content), degrees, a leading ``x =``, a leading ``+``, trailing
``.``, markdown ``**``, thousands separators (``1,000``), unit words after a number (``5 apples``),
and turns ``\\frac``/``\\dfrac``/``\\tfrac``/``\\frac12`` into ``a/b`` (``2\\frac{1}{2}`` is a mixed
number). Comparison: when both sides parse as numbers they are compared exactly as
``fractions.Fraction`` (``0.5 == 1/2 == \\frac{1}{2}``, but ``0.333 != 1/3``); a percentage matches
either its number or its value over 100 (``50% == 50 == 0.5``). Comma-separated tuples are compared
element by element. Otherwise the normalised strings are compared with spaces removed (words of
two or more letters ignore case, so ``Monday == monday``; single letters keep it: ``x != X``).

``regex_math_reward(response_text, answer)`` is 1.0 when the extracted answer matches, else 0.0.
"""

from __future__ import annotations

import re
from fractions import Fraction

_BOX = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])\s*")
_HASHES = re.compile(r"####\s*(.+)")
_ANSWER_PHRASE = re.compile(r"(?i)\banswer\s*(?:is|:|=)[\s:*]*(.+)")
_LAST_NUMBER = re.compile(r"(?:(?<![\w)\]}])-)?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?")
_SENTENCE_END = re.compile(r"\.(?:\s|$)")


def last_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}``/``\\fbox{...}``; None when there is none."""
    for match in reversed(list(_BOX.finditer(text))):
        content = _braced_or_token(text, match.end())
        if content is not None:
            return content
    return None


def _braced_or_token(text: str, start: int) -> str | None:
    if start >= len(text):
        return None
    if text[start] != "{":
        token = re.match(r"[^\s$]+", text[start:])
        return token.group() if token else None
    depth = 0
    i = start
    while i < len(text):
        ch = text[i]
        if ch == "\\":  # \{ and \} are literal braces, not grouping
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
        i += 1
    return None  # truncated response: the box never closed


def extract_answer(text: str) -> str | None:
    """The final answer in a response, or None when nothing answer-like is found."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed
    for pattern in (_HASHES, _ANSWER_PHRASE):
        matches = pattern.findall(text)
        if matches:
            answer = _SENTENCE_END.split(matches[-1].strip())[0].strip()
            if answer:
                return answer
    numbers = _LAST_NUMBER.findall(text)
    return numbers[-1] if numbers else None


# ---------------------------------------------------------------------------------------------
# Normalisation
# ---------------------------------------------------------------------------------------------

_DROP = ("\\left", "\\right", "\\displaystyle", "\\!", "\\,", "\\;", "\\:", "\\quad", "\\qquad", "\\ ", "~",
         "^{\\circ}", "^\\circ", "\\circ", "°", "\\$", "$", "\\(", "\\)", "\\[", "\\]")
_WRAPPER = re.compile(r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}")
_FRAC = re.compile(r"\\frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")
_FRAC_SHORT = re.compile(r"\\frac\s*(\d)\s*(\d)")
_FRAC_HALF_SHORT = re.compile(r"\\frac\s*\{([^{}]*)\}\s*(\d)")
_SQRT_SHORT = re.compile(r"\\sqrt\s*(\d+)")
_ASSIGNMENT = re.compile(r"^[a-zA-Z]\w*\s*=\s*(?=\S)")
_THOUSANDS = re.compile(r"[-+]?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_NUMBER_WITH_UNITS = re.compile(r"([-+]?(?:\d[\d,]*)?\.?\d+(?:/\d+)?%?)\s+[a-zA-Z][a-zA-Z\s.^\d]*")
_CHOICE = re.compile(r"^\(([A-Za-z])\)$")


def normalize_answer(answer: str) -> str:
    s = str(answer).strip()
    boxed = last_boxed(s)
    if boxed is not None:
        s = boxed
    s = s.replace("\u2212", "-").replace("\\%", "%").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    for token in _DROP:
        s = s.replace(token, "")
    previous = None
    while previous != s:  # innermost wrappers/fractions first, so nesting unwinds
        previous = s
        s = _WRAPPER.sub(r"\1", s)
        s = _FRAC.sub(r"(\1)/(\2)", s)
    s = _FRAC_SHORT.sub(r"(\1)/(\2)", s)
    s = _FRAC_HALF_SHORT.sub(r"(\1)/(\2)", s)
    s = _SQRT_SHORT.sub(r"\\sqrt{\1}", s)
    s = s.strip().strip("*").strip()
    s = _ASSIGNMENT.sub("", s)
    s = s.rstrip(".").strip()
    if s.startswith("+"):
        s = s[1:].lstrip()
    units = _NUMBER_WITH_UNITS.fullmatch(s)
    if units:
        s = units.group(1)
    if _THOUSANDS.fullmatch(s) or _THOUSANDS.fullmatch(s.rstrip("%")):
        s = s.replace(",", "")
    choice = _CHOICE.match(s)
    if choice:
        s = choice.group(1)
    return s


_SIMPLE = r"[-+]?(?:\d+\.?\d*|\.\d+)"
_PAREN_FRACTION = re.compile(rf"([-+]?)\(?({_SIMPLE})\)?/\(?({_SIMPLE})\)?")
_MIXED = re.compile(r"([-+]?)(\d+)\((\d+)\)/\((\d+)\)")


def to_number(s: str) -> tuple[Fraction, bool] | None:
    """``(value, is_percent)`` for a normalised answer, or None when it is not a plain number."""
    s = s.replace(" ", "")
    percent = s.endswith("%")
    if percent:
        s = s[:-1]
    try:
        return Fraction(s), percent
    except (ValueError, ZeroDivisionError):
        pass
    mixed = _MIXED.fullmatch(s)
    if mixed:
        sign, whole, num, den = mixed.groups()
        if int(den) == 0:
            return None
        value = int(whole) + Fraction(int(num), int(den))
        return (-value if sign == "-" else value), percent
    frac = _PAREN_FRACTION.fullmatch(s)
    if frac:
        sign, num, den = frac.groups()
        try:
            value = Fraction(num) / Fraction(den)
        except ZeroDivisionError:
            return None
        return (-value if sign == "-" else value), percent
    return None


def _numbers_match(a: tuple[Fraction, bool], b: tuple[Fraction, bool]) -> bool:
    (x, x_pct), (y, y_pct) = a, b
    if x == y:
        return True
    return (x_pct and x / 100 == y) or (y_pct and y / 100 == x)


def _split_top_level(s: str) -> list[str]:
    parts, depth, current = [], 0, []
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    return parts


def _normalized_match(p: str, t: str) -> bool:
    np_, nt = to_number(p), to_number(t)
    if np_ is not None and nt is not None:
        return _numbers_match(np_, nt)
    p_flat, t_flat = p.replace(" ", ""), t.replace(" ", "")
    if p_flat == t_flat:
        return True
    if p_flat.isalpha() and t_flat.isalpha() and len(p_flat) > 1:  # words, not variables: x != X
        return p_flat.lower() == t_flat.lower()
    # Tuples / intervals / lists: same brackets, same length, elements equal one by one.
    if p_flat[:1] == t_flat[:1] and p_flat[:1] in "([{" and p_flat[-1:] == t_flat[-1:]:
        p_flat, t_flat = p_flat[1:-1], t_flat[1:-1]
    p_items, t_items = _split_top_level(p_flat), _split_top_level(t_flat)
    if len(p_items) > 1 and len(p_items) == len(t_items):
        return all(_normalized_match(normalize_answer(a), normalize_answer(b)) for a, b in zip(p_items, t_items))
    return False


def answers_match(predicted: str | None, truth: str | None) -> bool:
    if predicted is None or truth is None:
        return False
    p, t = normalize_answer(predicted), normalize_answer(truth)
    if not p or not t:
        return False
    return _normalized_match(p, t)


def regex_math_reward(response_text: str, answer: str | None) -> float:
    """1.0 when the response's final answer equals ``answer``, else 0.0."""
    return 1.0 if answers_match(extract_answer(response_text), answer) else 0.0
