"""Task interface: tokenizers, the arithmetic task and its reward shaping, resumable streams,
the registry, and user reward functions by import path."""

from __future__ import annotations

import random
import textwrap

import pytest

from sapo_megatron.tasks import (
    ArithmeticConfig,
    ByteTokenizer,
    CharTokenizer,
    Prompt,
    PromptStream,
    Task,
    build_task,
    load_reward_fn,
)


# ---------------------------------------------------------------------------------------------
# Tokenizers
# ---------------------------------------------------------------------------------------------


def test_char_tokenizer_round_trip_and_specials():
    tok = CharTokenizer()
    assert tok.vocab_size == 16 and tok.pad_id == 0 and tok.eos_id == 1
    text = "12+3=15 - 0"
    assert tok.decode(tok.encode(text)) == text
    assert len(set(tok.encode("0123456789+-= "))) == 14
    # decode drops PAD/EOS but does not stop at them: cutting at EOS is the caller's job
    ids = tok.encode("7") + [tok.eos_id] + tok.encode("8") + [tok.pad_id]
    assert tok.decode(ids) == "78"


def test_char_tokenizer_errors_name_the_input():
    tok = CharTokenizer()
    with pytest.raises(ValueError, match=r"'x' at position 2 of '1\+x'"):
        tok.encode("1+x")
    with pytest.raises(ValueError, match="token id 16 is outside"):
        tok.decode([16])
    with pytest.raises(ValueError, match="unique"):
        CharTokenizer("aa")


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    text = "Solve $\\frac{1}{2} + x = 3$ — über ∑"
    assert tok.decode(tok.encode(text)) == text
    assert tok.decode(tok.encode("ab") + [tok.eos_id, tok.pad_id]) == "ab"
    assert tok.decode(tok.encode("é")[:1]) == "\ufffd"  # a cut multi-byte character is replaced, not fatal
    with pytest.raises(ValueError, match="outside"):
        tok.decode([258])


# ---------------------------------------------------------------------------------------------
# Arithmetic
# ---------------------------------------------------------------------------------------------


def test_arithmetic_prompts_are_well_formed_and_satisfy_the_protocol():
    task = build_task({"name": "arithmetic"})
    assert isinstance(task, Task) and task.tokenizer.vocab_size == 16
    prompts = PromptStream(task, seed=0).next_batch(200)
    for p in prompts:
        a, b, op = p.meta["a"], p.meta["b"], p.meta["op"]
        assert p.text == f"{a}{op}{b}=" and 0 <= a <= 4 and 0 <= b <= 4 and op == "+"
        assert p.answer == str(a + b) and len(p.answer) == 1
        assert p.ids == task.tokenizer.encode(p.text)
    assert len({p.uid for p in prompts}) == 200
    assert {p.text for p in prompts} == {f"{a}+{b}=" for a in range(5) for b in range(5)}


def test_arithmetic_harder_settings():
    task = build_task({"name": "arithmetic", "max_operand": 99, "operators": "+-*"})
    assert task.tokenizer.vocab_size == 17
    prompts = PromptStream(task, seed=3).next_batch(300)
    assert {p.meta["op"] for p in prompts} == {"+", "-", "*"}
    assert all(int(p.answer) >= 0 for p in prompts)  # allow_negative=False orders "-" operands
    assert max(int(p.answer) for p in prompts) > 100
    neg = build_task({"name": "arithmetic", "max_operand": 9, "operators": "-", "allow_negative": True})
    assert any(p.answer.startswith("-") for p in PromptStream(neg, seed=0).next_batch(100))


def test_arithmetic_prompts_deterministic_per_seed_and_split():
    task = build_task({"name": "arithmetic", "max_operand": 9})

    def texts(seed, split="train"):
        return [p.text for p in PromptStream(task, seed, split).next_batch(50)]

    assert texts(1) == texts(1)
    assert texts(1) != texts(2)
    assert texts(1, "test") != texts(1, "train")
    with pytest.raises(ValueError, match=r"unknown split 'valid'; known splits: \['train', 'test'\]"):
        next(task.prompts(seed=0, split="valid"))


def _resume_check(task, batch=5):
    reference = PromptStream(task, seed=7)
    expected = [[p.uid for p in reference.next_batch(batch)] for _ in range(4)]
    stream = PromptStream(task, seed=7)
    stream.next_batch(batch)
    stream.next_batch(batch)
    state = stream.state_dict()
    assert state == {"task": task.name, "seed": 7, "split": "train", "position": 2 * batch}
    resumed = PromptStream(task, seed=7)
    resumed.load_state_dict(state)
    assert [[p.uid for p in resumed.next_batch(batch)] for _ in range(2)] == expected[2:]


def test_stream_resume_gives_the_same_next_prompts():
    _resume_check(build_task({"name": "arithmetic"}))


def test_stream_resume_for_a_task_without_start():
    """A third-party task that only implements the narrow protocol is resumed by skipping."""

    class Counting:
        name = "counting"
        tokenizer = CharTokenizer()

        def prompts(self, *, seed, split="train"):
            i = 0
            while True:
                yield Prompt(uid=f"{seed}-{i}", text=str(i), ids=[], answer=None, meta={})
                i += 1

        def reward(self, prompt, response_ids, response_text):
            return 0.0

    _resume_check(Counting())


def test_stream_state_mismatch_is_refused():
    task = build_task({"name": "arithmetic"})
    state = PromptStream(task, seed=1).state_dict()
    with pytest.raises(ValueError, match="saved with seed=1, but this stream has seed=2"):
        PromptStream(task, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match=r"lacks \['position'\]"):
        PromptStream(task, seed=1).load_state_dict({"task": "arithmetic", "seed": 1, "split": "train"})
    with pytest.raises(ValueError, match="n must be >= 1"):
        PromptStream(task, seed=1).next_batch(0)


def _ids(task, text, eos=True):
    return task.tokenizer.encode(text) + ([task.tokenizer.eos_id] if eos else [])


@pytest.mark.parametrize(
    "response, eos, expected",
    [
        ("7", True, 1.0),  # exact
        ("7", False, 1.0),  # caller already stripped EOS
        ("7+", True, 0.5),  # right number, stray characters
        ("07", True, 0.5),  # right value, not the exact text
        (" 7", True, 0.5),
        ("=7=", True, 0.5),
        ("71", True, 0.1),  # a well-formed wrong number
        ("-3", True, 0.1),
        ("3+4", True, 0.0),  # wrong first number with extras
        ("+=", True, 0.0),  # garbage
        ("", True, 0.0),  # empty (EOS straight away)
        ("", False, 0.0),  # nothing at all
    ],
)
def test_arithmetic_reward_shaping(response, eos, expected):
    task = build_task({"name": "arithmetic"})
    prompt = Prompt(uid="u", text="3+4=", ids=task.tokenizer.encode("3+4="), answer="7", meta={})
    ids = _ids(task, response, eos)
    assert task.reward(prompt, ids, task.tokenizer.decode(ids)) == expected


def test_arithmetic_reward_cuts_at_eos_and_counts_pad_as_a_character():
    task = build_task({"name": "arithmetic"})
    tok = task.tokenizer
    prompt = Prompt(uid="u", text="3+4=", ids=tok.encode("3+4="), answer="7", meta={})
    assert task.reward(prompt, tok.encode("7") + [tok.eos_id] + tok.encode("99"), "") == 1.0
    assert task.reward(prompt, tok.encode("7") + [tok.pad_id, tok.eos_id], "") == 0.5
    assert task.reward(prompt, [tok.pad_id], "") == 0.0


def test_arithmetic_reward_without_shaping_and_with_custom_credit():
    plain = build_task({"name": "arithmetic", "shaping": False})
    custom = build_task({"name": "arithmetic", "partial_credit": 0.3, "format_credit": 0.0})
    prompt = Prompt(uid="u", text="3+4=", ids=[], answer="7", meta={})
    tok = plain.tokenizer
    assert [plain.reward(prompt, tok.encode(r), r) for r in ("7", "7+", "71")] == [1.0, 0.0, 0.0]
    assert [custom.reward(prompt, tok.encode(r), r) for r in ("7", "7+", "71")] == [1.0, 0.3, 0.0]


def test_random_policy_hits_the_reward():
    """A uniform policy over the 16 tokens (what a fresh tiny model is, roughly) must see every
    reward level, or RL has nothing to climb from."""
    task = build_task({"name": "arithmetic"})
    rng = random.Random(0)
    prompts = PromptStream(task, seed=0).next_batch(4000)
    rewards = []
    for p in prompts:
        ids = [rng.randrange(task.tokenizer.vocab_size) for _ in range(4)]
        rewards.append(task.reward(p, ids, task.tokenizer.decode(ids)))
    assert set(rewards) == {0.0, 0.1, 0.5, 1.0}
    exact = rewards.count(1.0) / len(rewards)
    assert 0.002 < exact < 0.01  # about 1/16 * 1/16 = 0.0039
    assert all(0.0 <= r <= 1.0 for r in rewards)


# ---------------------------------------------------------------------------------------------
# Registry and bad configs
# ---------------------------------------------------------------------------------------------


def test_build_task_errors():
    with pytest.raises(ValueError, match=r"unknown task 'arith'; known tasks: \['arithmetic', 'calculator', 'math'\]"):
        build_task({"name": "arith"})
    with pytest.raises(ValueError, match="has no 'name'"):
        build_task({"max_operand": 3})
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['max_operandd'\]; known options: \['min_operand'"):
        build_task({"name": "arithmetic", "max_operandd": 3})
    with pytest.raises(ValueError, match="min_operand <= max_operand"):
        build_task({"name": "arithmetic", "min_operand": 5, "max_operand": 3})
    with pytest.raises(ValueError, match=r"operators must be a non-empty string of \['\*', '\+', '-'\], got '/'"):
        build_task({"name": "arithmetic", "operators": "/"})
    with pytest.raises(ValueError, match="partial_credit must be in"):
        ArithmeticConfig(partial_credit=1.5)
    with pytest.raises(TypeError, match="must be a dict"):
        build_task("arithmetic")


# ---------------------------------------------------------------------------------------------
# User reward functions
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def user_rewards(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(textwrap.dedent("""
        calls = []

        def length_match(prompt_text, response_text, answer, meta):
            calls.append((prompt_text, response_text, answer, meta))
            return 1.0 if response_text.strip() == answer else 0.25

        def as_bool(prompt_text, response_text, answer, meta):
            return response_text == answer

        def too_big(prompt_text, response_text, answer, meta):
            return 2.0

        def round_off(prompt_text, response_text, answer, meta):
            return 1.0 + 1e-9

        def nan(prompt_text, response_text, answer, meta):
            return float("nan")

        def text(prompt_text, response_text, answer, meta):
            return "1.0"

        class Scorers:
            @staticmethod
            def zero(prompt_text, response_text, answer, meta):
                return 0

        NOT_A_FUNCTION = 3
        """))
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_rewards"


def test_user_reward_fn_replaces_the_task_reward(user_rewards):
    import my_rewards

    task = build_task({"name": "arithmetic", "reward_fn": "my_rewards:length_match"})
    prompt = PromptStream(task, seed=0).next_batch(1)[0]
    assert task.reward(prompt, [], prompt.answer) == 1.0
    assert task.reward(prompt, [], "junk") == 0.25
    assert my_rewards.calls[0] == (prompt.text, prompt.answer, prompt.answer, prompt.meta)
    # prompts, tokenizer and resumability come from the wrapped task
    assert task.name == "arithmetic" and task.tokenizer.vocab_size == 16
    _resume_check(task)
    as_bool = build_task({"name": "arithmetic", "reward_fn": "my_rewards:as_bool"})
    assert as_bool.reward(prompt, [], prompt.answer) == 1.0
    assert build_task({"name": "arithmetic", "reward_fn": "my_rewards:Scorers.zero"}).reward(prompt, [], "x") == 0.0
    assert build_task({"name": "arithmetic", "reward_fn": "my_rewards:round_off"}).reward(prompt, [], "x") == 1.0


@pytest.mark.parametrize(
    "fn, error, message",
    [
        ("too_big", ValueError, r"reward_fn 'my_rewards:too_big' returned 2.0 for prompt 'arithmetic-train-0-0'"),
        ("nan", ValueError, r"reward_fn 'my_rewards:nan' returned nan .* finite and in \[0, 1\]"),
        ("text", TypeError, r"reward_fn 'my_rewards:text' returned '1.0' \(str\)"),
    ],
)
def test_user_reward_bad_values_are_refused(user_rewards, fn, error, message):
    task = build_task({"name": "arithmetic", "reward_fn": f"my_rewards:{fn}"})
    prompt = PromptStream(task, seed=0).next_batch(1)[0]
    with pytest.raises(error, match=message):
        task.reward(prompt, [], "7")


@pytest.mark.parametrize(
    "path, error, message",
    [
        ("my_rewards.length_match", ValueError, "must look like 'package.module:function'"),
        ("my_rewards:", ValueError, "must look like"),
        ("a:b:c", ValueError, "must look like"),
        ("no_such_module_xyz:fn", ImportError, r"'no_such_module_xyz:fn': cannot import module 'no_such_module_xyz'"),
        ("my_rewards:missing", ImportError, r"'my_rewards:missing': 'my_rewards' has no attribute 'missing'"),
        ("my_rewards:NOT_A_FUNCTION", TypeError, "is a int, not a function"),
    ],
)
def test_user_reward_bad_import_paths(user_rewards, path, error, message):
    with pytest.raises(error, match=message):
        load_reward_fn(path)
    with pytest.raises(error, match=message):
        build_task({"name": "arithmetic", "reward_fn": path})


def test_task_modules_import_without_cycles():
    """base <- user_reward <- registry: each imports only modules below it (no cycle)."""
    import ast
    from pathlib import Path

    import sapo_megatron.tasks as tasks

    root = Path(tasks.__file__).parent

    def local_imports(name: str) -> set[str]:
        tree = ast.parse((root / f"{name}.py").read_text())
        return {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level == 1}

    assert "registry" not in local_imports("base") and "user_reward" not in local_imports("base")
    assert local_imports("user_reward") == {"base"}
    assert {"base", "user_reward"} <= local_imports("registry")
