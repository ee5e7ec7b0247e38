"""Reading prompt sets (JSONL, JSON, Parquet) and parsing the GSM8K / DAPO-Math / AIME record formats.

Supported record formats (``format=`` in the task config; ``auto`` picks by the first record):

- ``gsm8k``: ``{"question": str, "answer": str}`` where the answer's last line is ``#### <number>``
  (the worked solution above it is ignored). Example: openai/gsm8k.
- ``dapo``: the verl layout of BytedTsinghua-SIA/DAPO-Math-17k:
  ``{"prompt": [{"role": "user", "content": str}, ...], "reward_model": {"ground_truth": str, ...},
  "data_source", "ability", "extra_info"}``; the question is the last user message (the dataset's
  own text already asks for ``Answer: ...``), the other keys are kept in ``meta``.
- ``aime``: ``{"problem" | "question": str, "answer": str | int}``, with capitalised keys
  (``Problem``/``Answer``) accepted, and ``solution`` used when there is no ``answer`` (its last
  ``\\boxed{}`` is the answer). Fits the MATH and AIME 2024/2025 releases.

Parquet needs ``pyarrow``; it is optional and asked for only when a ``.parquet`` file is read.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from sapo_megatron.jsonl import JSONLineError, json_lines

from .answer_check import extract_answer, last_boxed

BOXED_INSTRUCTION = "{question}\nPlease reason step by step, and put your final answer within \\boxed{}."


@dataclass
class Record:
    index: int  # position in the file, 0-based
    where: str  # "line 7" / "row 6", for error messages
    question: str
    answer: str
    messages: list[dict] | None  # the record's own chat messages (DAPO), else None
    meta: dict


class RecordError(ValueError):
    pass


def read_records(path: str | Path) -> list[tuple[str, Any]]:
    """``[(where, record), ...]`` from a ``.jsonl``, ``.json`` (a list) or ``.parquet`` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file {str(path)!r} does not exist")
    suffix = path.suffix.lower()
    if suffix not in READERS:
        raise ValueError(f"prompt file {str(path)!r}: unsupported extension {suffix!r}; supported: {sorted(READERS)}")
    return READERS[suffix](path)


def _read_jsonl(path: Path) -> list[tuple[str, Any]]:
    try:
        return [(f"line {lineno}", value) for lineno, value in json_lines(path)]
    except JSONLineError as err:
        raise RecordError(str(err)) from None


def _read_json(path: Path) -> list[tuple[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise RecordError(f"{path}: not valid JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, list):
        raise RecordError(f"{path}: a .json prompt file must hold a list of records, got {type(data).__name__}")
    return [(f"item {i}", r) for i, r in enumerate(data)]


def _read_parquet(path: Path) -> list[tuple[str, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise ImportError(f"reading {path} needs pyarrow: pip install pyarrow") from None
    return [(f"row {i}", r) for i, r in enumerate(pq.read_table(path).to_pylist())]


READERS: dict[str, Callable[[Path], list[tuple[str, Any]]]] = {
    ".jsonl": _read_jsonl,
    ".json": _read_json,
    ".parquet": _read_parquet,
}


# ---------------------------------------------------------------------------------------------
# Formats: each parses one record into (question, answer, messages, meta) or raises RecordError.
# ---------------------------------------------------------------------------------------------


@dataclass
class RecordFormat:
    name: str
    expected: str  # the fields, as written in error messages
    default_template: str
    matches: Callable[[dict], bool]
    parse: Callable[[dict], tuple[str, str, list[dict] | None, dict]]


def _text(record: dict, key: str) -> str:
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise RecordError(f"field {key!r} must be a string, got {type(value).__name__}")
    return str(value).strip()


def _first_key(record: dict, keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if record.get(k) is not None), None)


def _parse_gsm8k(record: dict) -> tuple[str, str, None, dict]:
    question, solution = _text(record, "question"), _text(record, "answer")
    if "####" not in solution:
        raise RecordError("field 'answer' has no '#### <number>' final line")
    answer = solution.rsplit("####", 1)[1].strip().replace(",", "")
    if not answer:
        raise RecordError("field 'answer' has nothing after '####'")
    return question, answer, None, {"solution": solution}


def _parse_dapo(record: dict) -> tuple[str, str, list[dict], dict]:
    prompt, reward_model = record["prompt"], record["reward_model"]
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in prompt):
        raise RecordError("field 'prompt' must be a list of {'role', 'content'} messages")
    users = [m for m in prompt if m["role"] == "user"]
    if not users:
        raise RecordError("field 'prompt' has no message with role 'user'")
    if not isinstance(reward_model, dict) or reward_model.get("ground_truth") is None:
        raise RecordError("field 'reward_model' must be a dict with 'ground_truth'")
    meta = {k: record[k] for k in ("data_source", "ability", "extra_info") if k in record}
    return str(users[-1]["content"]), str(reward_model["ground_truth"]).strip(), [dict(m) for m in prompt], meta


_QUESTION_KEYS = ("problem", "question", "Problem", "Question")
_ANSWER_KEYS = ("answer", "Answer")
_SOLUTION_KEYS = ("solution", "Solution")


def _parse_aime(record: dict) -> tuple[str, str, None, dict]:
    qkey = _first_key(record, _QUESTION_KEYS)
    akey = _first_key(record, _ANSWER_KEYS)
    skey = _first_key(record, _SOLUTION_KEYS)
    if qkey is None or (akey is None and skey is None):
        raise KeyError(_QUESTION_KEYS[0] if qkey is None else _ANSWER_KEYS[0])
    if akey is not None:
        answer = _text(record, akey)
    else:
        solution = _text(record, skey)
        answer = last_boxed(solution) or extract_answer(solution) or ""
        if not answer:
            raise RecordError(f"field {skey!r} has no \\boxed{{}} or final number to take as the answer")
    meta = {k: record[k] for k in record if k not in (qkey, akey)}
    return _text(record, qkey), answer, None, meta


FORMATS: dict[str, RecordFormat] = {
    "gsm8k": RecordFormat(
        "gsm8k", "{'question', 'answer' ending in '#### <number>'}", BOXED_INSTRUCTION,
        lambda r: "question" in r and isinstance(r.get("answer"), str) and "####" in r["answer"], _parse_gsm8k),
    "dapo": RecordFormat(
        "dapo", "{'prompt': [{'role', 'content'}], 'reward_model': {'ground_truth'}}", "{question}",
        lambda r: "prompt" in r and "reward_model" in r, _parse_dapo),
    "aime": RecordFormat(
        "aime", "{'problem' or 'question', 'answer' or 'solution'}", BOXED_INSTRUCTION,
        lambda r: _first_key(r, _QUESTION_KEYS) is not None
        and _first_key(r, _ANSWER_KEYS + _SOLUTION_KEYS) is not None, _parse_aime),
}


def detect_format(path: str | Path, first: Any) -> RecordFormat:
    if isinstance(first, dict):
        for fmt in FORMATS.values():
            if fmt.matches(first):
                return fmt
    keys = sorted(first) if isinstance(first, dict) else type(first).__name__
    raise RecordError(f"{path}: cannot tell the format from the first record (fields {keys}); set format to one "
                      f"of {sorted(FORMATS)}: " + "; ".join(f"{f.name}: {f.expected}" for f in FORMATS.values()))


def load_prompt_set(path: str | Path, format: str = "auto") -> tuple[RecordFormat, list[Record]]:
    raw = read_records(path)
    if not raw:
        raise RecordError(f"prompt file {str(path)!r} holds no records")
    if format == "auto":
        fmt = detect_format(path, raw[0][1])
    elif format in FORMATS:
        fmt = FORMATS[format]
    else:
        raise ValueError(f"unknown prompt format {format!r}; known formats: {sorted(FORMATS) + ['auto']}")
    records = []
    for index, (where, record) in enumerate(raw):
        try:
            if not isinstance(record, dict):
                raise RecordError(f"is a {type(record).__name__}, not an object")
            question, answer, messages, meta = fmt.parse(record)
        except KeyError as e:
            found = sorted(record) if isinstance(record, dict) else []
            raise RecordError(f"{path}: record {index} ({where}) lacks field {e.args[0]!r}; {fmt.name} records need "
                              f"{fmt.expected}, found fields {found}") from None
        except RecordError as e:
            raise RecordError(f"{path}: record {index} ({where}) {e}; {fmt.name} records need {fmt.expected}") from None
        if not question:
            raise RecordError(f"{path}: record {index} ({where}) has an empty question")
        records.append(Record(index, where, question, answer, messages, meta))
    return fmt, records
