"""``math``: verifiable math prompt sets (GSM8K / DAPO-Math / AIME layouts) scored by ``math_grading``.

Config (``build_task``)::

    {"name": "math", "path": "train.parquet", "format": "auto" | "gsm8k" | "dapo" | "aime",
     "tokenizer": "/models/Qwen3-30B-A3B" | "byte" | "char" | <Tokenizer>,
     "eval_path": "aime24.jsonl",        # the "test" split; optional
     "template": "{question}\\n...",    # default: ask for \\boxed{} (DAPO: the dataset's own text)
     "chat": False,                      # True: encode through the tokenizer's chat template
     "shuffle": True,                    # train split only; "test" keeps file order
     "verifier": "auto",                 # "math_verify" (HF, default when installed) | "regex"
     "verifier_timeout_s": 5.0}          # per response; past it the response scores 0

The train split visits the file in a fresh permutation every epoch, drawn from ``(seed, epoch)``,
so position ``p`` is ``perm_{p // N}[p % N]`` and a stream resumes in O(1). ``uid`` is
``"<file stem>:<record index>"``: the same problem keeps its uid across epochs (for logging);
it can repeat inside one batch only when the batch is larger than the file or straddles an epoch.
The reward is 1.0 when the response's final answer matches the ground truth, else 0.0; the
verifier is resolved once when the task is built (``auto`` -> ``math_verify`` if installed).
The reward is binary, so ``score`` reports it as the exactness too (``exact_frac``, no second
verifier call).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from .base import Prompt, Score, check_split
from .math_grading import DEFAULT_TIMEOUT_S, math_reward, resolve_verifier
from .prompt_sets import Record, RecordFormat, load_prompt_set
from .registry import config_from_options, register_task
from .tokenizers import build_tokenizer


@dataclass
class MathConfig:
    path: str | None = None
    tokenizer: Any = None
    format: str = "auto"
    eval_path: str | None = None
    template: str | None = None
    chat: bool = False
    shuffle: bool = True
    verifier: str = "auto"
    verifier_timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.path is None:
            raise ValueError("task 'math' needs 'path': a .jsonl, .json or .parquet prompt file")
        if self.tokenizer is None:
            raise ValueError("task 'math' needs 'tokenizer': a local Hugging Face tokenizer directory, "
                             "'byte' or 'char'")
        if self.template is not None and "{question}" not in self.template:
            raise ValueError(f"task 'math': template must contain '{{question}}', got {self.template!r}")
        try:
            self.verifier = resolve_verifier(self.verifier)
        except ValueError as err:
            raise ValueError(f"task 'math': {err}") from None
        if not self.verifier_timeout_s > 0:
            raise ValueError(f"task 'math': verifier_timeout_s must be > 0, got {self.verifier_timeout_s}")


@dataclass
class _PromptSet:
    stem: str
    format: RecordFormat
    records: list[Record]


class MathTask:
    name = "math"

    def __init__(self, config: MathConfig):
        self.config = config
        self.tokenizer = build_tokenizer(config.tokenizer)
        if config.chat and not hasattr(self.tokenizer, "encode_chat"):
            raise ValueError(f"task 'math': chat=True needs a tokenizer with a chat template (HFTokenizer), "
                             f"got {type(self.tokenizer).__name__}")
        self._sets = {"train": self._load(config.path)}
        if config.eval_path is not None:
            self._sets["test"] = self._load(config.eval_path)
        self._ids_cache: dict[tuple[str, int], list[int]] = {}

    def _load(self, path: str) -> _PromptSet:
        fmt, records = load_prompt_set(path, self.config.format)
        return _PromptSet(Path(path).stem, fmt, records)

    def num_records(self, split: str = "train") -> int:
        return len(self._prompt_set(split).records)

    def _prompt_set(self, split: str) -> _PromptSet:
        check_split(self.name, split)
        if split not in self._sets:
            raise ValueError(f"task 'math' has no {split!r} split: set 'eval_path' to a prompt file")
        return self._sets[split]

    def _render(self, prompt_set: _PromptSet, record: Record) -> tuple[str, list[dict]]:
        template = self.config.template or prompt_set.format.default_template
        text = template.replace("{question}", record.question)
        messages = [dict(m) for m in record.messages] if record.messages else [{"role": "user", "content": text}]
        last_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
        messages[last_user]["content"] = text
        return text, messages

    def make_prompt(self, split: str, record_index: int, position: int) -> Prompt:
        prompt_set = self._prompt_set(split)
        record = prompt_set.records[record_index]
        text, messages = self._render(prompt_set, record)
        key = (split, record_index)
        if key not in self._ids_cache:
            encode = self.tokenizer.encode_chat if self.config.chat else self.tokenizer.encode
            self._ids_cache[key] = encode(messages if self.config.chat else text)
        meta = dict(record.meta, index=position, record=record.index, format=prompt_set.format.name)
        if self.config.chat:
            meta["messages"] = messages
        return Prompt(uid=f"{prompt_set.stem}:{record.index}", text=text, ids=list(self._ids_cache[key]),
                      answer=record.answer, meta=meta)

    def prompts(self, *, seed: int, split: str = "train", start: int = 0) -> Iterator[Prompt]:
        n = len(self._prompt_set(split).records)
        shuffle = self.config.shuffle and split == "train"
        position, epoch, order = start, None, list(range(n))
        while True:
            if shuffle and position // n != epoch:
                epoch = position // n
                order = list(range(n))
                random.Random(f"math:{seed}:{split}:{epoch}").shuffle(order)
            yield self.make_prompt(split, order[position % n], position)
            position += 1

    def reward(self, prompt: Prompt, response_ids: list[int], response_text: str) -> float:
        return math_reward(response_text, prompt.answer, verifier=self.config.verifier,
                           timeout_s=self.config.verifier_timeout_s)

    def score(self, prompt: Prompt, response_ids: list[int], response_text: str) -> Score:
        reward = self.reward(prompt, response_ids, response_text)
        return Score(reward, reward >= 1.0)


@register_task("math")
def build_math(**options) -> MathTask:
    return MathTask(config_from_options(MathConfig, "math", options))
