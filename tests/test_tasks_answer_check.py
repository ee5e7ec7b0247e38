"""Our regex answer checker (``tasks.answer_check``): extraction, normalisation, comparison."""

from __future__ import annotations

import pytest

from sapo_megatron.tasks.answer_check import answers_match, extract_answer, normalize_answer, regex_math_reward


@pytest.mark.parametrize(
    "response, expected",
    [
        (r"so the result is $\boxed{42}$.", "42"),
        (r"first \boxed{1}, then corrected: \boxed{2}", "2"),  # the last box wins
        (r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{\sqrt{3}}{2}"),  # nested braces
        (r"\boxed{\{1, 2\}}", r"\{1, 2\}"),  # escaped braces are not grouping
        (r"\fbox{7}", "7"),
        (r"\boxed 5 is it", "5"),  # \boxed without braces
        (r"\boxed{3} and then \boxed{4", "3"),  # a truncated last box falls back to the complete one
        ("She has 10 left.\n#### 10", "10"),
        ("Therefore, the answer is 3.5.", "3.5"),
        ("The final answer is $\\frac{1}{2}$. Done", "$\\frac{1}{2}$"),
        ("blah\nAnswer: 34", "34"),  # DAPO's requested format
        ("**Answer:** 12", "12"),
        ("I think x-3 equals 9, and 12 remain", "12"),  # last number
        ("it costs 1,250 dollars", "1,250"),
        ("x-3", "3"),  # a minus after a letter is not a sign
        ("so -4", "-4"),
        ("", None),
        ("no numbers here", None),
    ],
)
def test_extract_answer(response, expected):
    assert extract_answer(response) == expected


@pytest.mark.parametrize(
    "predicted, truth",
    [
        ("42", "42"),
        ("42.", "42"),
        ("+42", "42"),
        (" 42 ", "42"),
        ("$42$", "42"),
        (r"\$42", "42"),
        ("42.0", "42"),
        ("1,000", "1000"),
        ("1,000,000.50", "1000000.5"),
        ("0.5", "1/2"),
        (".5", r"\frac{1}{2}"),
        (r"\dfrac{1}{2}", "0.5"),
        (r"\tfrac12", "1/2"),
        (r"\frac{3}{4}", "0.75"),
        (r"-\frac{1}{2}", "-0.5"),
        (r"\frac{-1}{2}", "-1/2"),
        (r"2\frac{1}{2}", "5/2"),  # mixed number
        ("50%", "50"),
        (r"50\%", "0.5"),
        ("25", "25%"),
        ("10 apples", "10"),
        (r"10\text{ cm}", "10"),
        (r"5 \text{ dollars}", "5"),
        (r"90^\circ", "90"),
        (r"90^{\circ}", "90"),
        ("x = 5", "5"),
        ("\u22125", "-5"),  # unicode minus
        ("1e3", "1000"),
        (r"\text{(B)}", "B"),
        ("(C)", "C"),
        (r"\text{Monday}", "monday"),
        ("(1, 2)", "(1,2)"),
        (r"\left( 1, \frac{1}{2} \right)", "(1, 0.5)"),
        (r"\sqrt2", r"\sqrt{2}"),
        (r"\frac{\sqrt{3}}{2}", r"\dfrac{\sqrt{3}}{2}"),
        (r"\boxed{7}", "7"),
        ("**18**", "18"),
        (r"3\sqrt{2}", r"3 \sqrt{2}"),
    ],
)
def test_answers_match(predicted, truth):
    assert answers_match(predicted, truth), (normalize_answer(predicted), normalize_answer(truth))


@pytest.mark.parametrize(
    "predicted, truth",
    [
        ("0.333", "1/3"),  # exact comparison: no tolerance
        ("43", "42"),
        ("-42", "42"),
        ("4.2", "42"),
        ("12", "1,2"),
        ("(1, 2)", "(2, 1)"),
        ("(1, 2)", "(1, 2, 3)"),
        ("5x", "5"),  # only whitespace-separated words are units
        ("1/0", "0"),
        ("", "0"),
        (None, "3"),
        ("3", None),
        (r"\frac{1}{2}", "2"),
        ("x", "X"),  # variables keep their case
    ],
)
def test_answers_do_not_match(predicted, truth):
    assert not answers_match(predicted, truth)


@pytest.mark.parametrize(
    "response, truth, reward",
    [
        ("Each box has 6, so 4 boxes hold 24.\n#### 24", "24", 1.0),
        (r"<think>maybe 12? no.</think> The total is $\boxed{\dfrac{3}{2}}$.", "1.5", 1.0),
        ("So she pays $1,200.", "1200", 1.0),
        ("Answer: 34", "34", 1.0),
        (r"The answer is \boxed{25\%}.", "25", 1.0),
        ("I am not sure.", "7", 0.0),
        (r"\boxed{}", "0", 0.0),
        ("", "3", 0.0),
        (r"Hence \boxed{8}. Check: 2+2=4", "8", 1.0),  # the box beats the trailing number
    ],
)
def test_regex_math_reward(response, truth, reward):
    assert regex_math_reward(response, truth) == reward
