"""Tasks and rewards for RL training: what to prompt with and how to score the responses.

Layout: ``base`` (the ``Tokenizer``/``Prompt``/``Task`` interface and the resumable
``PromptStream``), ``registry`` (``register_task``, ``build_task``), ``tokenizers`` (char, byte,
lazy HF), ``arithmetic`` (the embedded CPU default), ``calculator`` (arithmetic with a calculator tool:
multi-turn episodes, ``rollout/episodes.py``), ``prompt_sets`` (JSONL/JSON/Parquet and the
GSM8K / DAPO-Math / AIME layouts), ``math_task`` (``math``), ``math_grading`` (the verifier
registry: HF math-verify by default, ``answer_check``'s regex checker as the fallback),
``deadline`` (a time limit that works in any thread), ``user_reward``
(``reward_fn: "package.module:function"``).

Use::

    task = build_task({"name": "arithmetic", "max_operand": 4})
    stream = PromptStream(task, seed=0)
    batch = stream.next_batch(8)                      # list[Prompt]; feed prompt.ids
    r = task.reward(batch[0], response_ids, task.tokenizer.decode(response_ids))
    ckpt["data"] = stream.state_dict()                # later: stream.load_state_dict(ckpt["data"])
"""
from . import arithmetic, calculator, math_task  # noqa: F401  (register the built-in tasks)
from .arithmetic import ArithmeticConfig, ArithmeticTask, arithmetic_reward
from .calculator import CalculatorConfig, CalculatorTask
from .answer_check import answers_match, extract_answer, normalize_answer, regex_math_reward
from .base import SPLITS, Prompt, PromptStream, Score, Task, Tokenizer, reference_response_ids, score_response
from .math_grading import VERIFIERS, math_reward, resolve_verifier
from .math_task import MathConfig, MathTask
from .prompt_sets import FORMATS, RecordError, load_prompt_set
from .registry import TASKS, build_task, register_task
from .tokenizers import ByteTokenizer, CharTokenizer, HFTokenizer, build_tokenizer
from .user_reward import UserRewardTask, load_reward_fn

__all__ = [
    "FORMATS",
    "SPLITS",
    "TASKS",
    "VERIFIERS",
    "ArithmeticConfig",
    "ArithmeticTask",
    "ByteTokenizer",
    "CalculatorConfig",
    "CalculatorTask",
    "CharTokenizer",
    "HFTokenizer",
    "MathConfig",
    "MathTask",
    "Prompt",
    "PromptStream",
    "RecordError",
    "Score",
    "Task",
    "Tokenizer",
    "UserRewardTask",
    "answers_match",
    "arithmetic_reward",
    "build_task",
    "build_tokenizer",
    "extract_answer",
    "load_prompt_set",
    "load_reward_fn",
    "math_reward",
    "normalize_answer",
    "regex_math_reward",
    "reference_response_ids",
    "register_task",
    "resolve_verifier",
    "score_response",
]
