"""The ``math`` task: JSONL/JSON/Parquet prompt sets in GSM8K / DAPO-Math / AIME layouts, its
stream, the HF tokenizer adapter, and every bad input naming what is wrong."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from sapo_megatron.tasks import HFTokenizer, PromptStream, RecordError, build_task, load_prompt_set

SAMPLE = Path(__file__).resolve().parents[1] / "examples" / "data" / "gsm8k_sample.jsonl"

DAPO_INSTRUCTION = ("Solve the following math problem step by step. The last line of your response should be of the "
                    "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n")
DAPO_RECORDS = [
    {"data_source": "math_dapo", "ability": "MATH", "extra_info": {"index": f"id-{i}"},
     "prompt": [{"role": "user", "content": DAPO_INSTRUCTION + q + '\n\nRemember to put your answer on its own line '
                 'after "Answer:".'}],
     "reward_model": {"ground_truth": a, "style": "rule-lang"}}
    for i, (q, a) in enumerate([("What is $3^4$?", "81"), ("Compute $\\binom{5}{2}$.", "10"),
                                ("Find the sum of the roots of $x^2-7x+2$.", "7")])
]


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def math_task(path, **options):
    return build_task({"name": "math", "path": str(path), "tokenizer": "byte", **options})


# ---------------------------------------------------------------------------------------------
# Formats
# ---------------------------------------------------------------------------------------------


def test_gsm8k_sample_file():
    fmt, records = load_prompt_set(SAMPLE)
    assert fmt.name == "gsm8k" and len(records) == 5
    assert [r.answer for r in records] == ["22", "180", "7.5", "6", "600"]
    assert records[0].question.startswith("A baker fills 6 trays") and "####" in records[0].meta["solution"]


def test_gsm8k_prompts_reward_and_template():
    task = math_task(SAMPLE, format="gsm8k")
    prompt = next(p for p in PromptStream(task, seed=0).next_batch(5) if p.uid == "gsm8k_sample:2")
    assert prompt.text.endswith("put your final answer within \\boxed{}.")
    assert prompt.ids == list(prompt.text.encode()) and prompt.answer == "7.5"
    assert prompt.meta["record"] == 2 and prompt.meta["format"] == "gsm8k"
    assert task.reward(prompt, [], "120 / 16 = 7.5 minutes, so $\\boxed{\\frac{15}{2}}$") == 1.0
    assert task.reward(prompt, [], "\\boxed{8}") == 0.0
    custom = math_task(SAMPLE, template="Q: {question}\nA:", shuffle=False)
    first = PromptStream(custom, seed=0).next_batch(1)[0]
    assert first.text == "Q: A baker fills 6 trays with 12 rolls each. She sells 50 rolls in the morning. " \
                         "How many rolls are left?\nA:"


def test_dapo_format(tmp_path):
    path = write_jsonl(tmp_path / "dapo.jsonl", DAPO_RECORDS)
    task = math_task(path)  # auto-detected
    prompts = {p.uid: p for p in PromptStream(task, seed=0).next_batch(3)}
    p = prompts["dapo:1"]
    assert p.text == DAPO_RECORDS[1]["prompt"][0]["content"]  # the dataset's own instruction, untouched
    assert p.answer == "10" and p.meta["data_source"] == "math_dapo" and p.meta["extra_info"] == {"index": "id-1"}
    assert task.reward(p, [], "C(5,2) = 10.\nAnswer: 10") == 1.0
    assert task.reward(p, [], "Answer: 11") == 0.0


def test_aime_formats(tmp_path):
    path = write_jsonl(tmp_path / "aime24.jsonl", [
        {"Problem": "Find the remainder when $2^{10}$ is divided by 7.", "Answer": 2, "ID": "2024-I-1"},
        {"problem": "What is $1+1$?", "solution": "Clearly $1+1=\\boxed{2}$."},
        {"question": "Half of 9?", "answer": "\\frac{9}{2}"},
    ])
    _, records = load_prompt_set(path, "aime")
    assert [r.answer for r in records] == ["2", "2", "\\frac{9}{2}"]
    assert records[0].meta == {"ID": "2024-I-1"}
    task = math_task(path, shuffle=False)
    p = PromptStream(task, seed=0).next_batch(3)[2]
    assert task.reward(p, [], "so \\boxed{4.5}") == 1.0


def test_json_list_file(tmp_path):
    path = tmp_path / "set.json"
    path.write_text(json.dumps([{"problem": "1+2?", "answer": "3"}]))
    assert load_prompt_set(path)[1][0].answer == "3"


def test_parquet_matches_jsonl(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    for name, records in (("gsm8k", [json.loads(line) for line in SAMPLE.read_text().splitlines()]),
                          ("dapo", DAPO_RECORDS)):
        pq.write_table(pa.Table.from_pylist(records), tmp_path / f"{name}.parquet")
        write_jsonl(tmp_path / f"{name}.jsonl", records)
        fmt_p, from_parquet = load_prompt_set(tmp_path / f"{name}.parquet")
        fmt_j, from_jsonl = load_prompt_set(tmp_path / f"{name}.jsonl")
        assert fmt_p.name == fmt_j.name == name
        assert [(r.question, r.answer, r.messages) for r in from_parquet] == \
               [(r.question, r.answer, r.messages) for r in from_jsonl]
        assert from_parquet[1].where == "row 1"


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    path = tmp_path / "x.parquet"
    path.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ImportError, match="x.parquet needs pyarrow: pip install pyarrow"):
        load_prompt_set(path)


# ---------------------------------------------------------------------------------------------
# Stream
# ---------------------------------------------------------------------------------------------


def test_math_stream_epochs_determinism_and_resume():
    task = math_task(SAMPLE)
    uids = [p.uid for p in PromptStream(task, seed=3).next_batch(15)]
    for epoch in range(3):  # every epoch is a permutation of the file
        assert sorted(uids[5 * epoch : 5 * epoch + 5]) == [f"gsm8k_sample:{i}" for i in range(5)]
    assert uids[:5] != uids[5:10] or uids[5:10] != uids[10:15]
    assert uids == [p.uid for p in PromptStream(task, seed=3).next_batch(15)]
    assert uids != [p.uid for p in PromptStream(task, seed=4).next_batch(15)]
    stream = PromptStream(task, seed=3)
    stream.next_batch(7)
    resumed = PromptStream(math_task(SAMPLE), seed=3)
    resumed.load_state_dict(stream.state_dict())
    assert [p.uid for p in resumed.next_batch(8)] == uids[7:]


def test_eval_split_keeps_file_order(tmp_path):
    task = math_task(SAMPLE, eval_path=str(write_jsonl(tmp_path / "ev.jsonl", [{"problem": "2*3?", "answer": "6"},
                                                                               {"problem": "2*4?", "answer": "8"}])))
    assert [p.uid for p in PromptStream(task, seed=0, split="test").next_batch(5)] == \
           ["ev:0", "ev:1", "ev:0", "ev:1", "ev:0"]
    assert task.num_records("test") == 2 and task.num_records() == 5


# ---------------------------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="prompt file '.*nope.jsonl' does not exist"):
        math_task(tmp_path / "nope.jsonl")


def test_jsonl_line_that_is_not_json(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"question": "a", "answer": "#### 1"}\n\n{"question": "b", answer: 2}\n')
    with pytest.raises(RecordError, match=r"bad.jsonl: line 3 is not valid JSON \(Expecting property name"):
        math_task(path)


def test_record_lacking_fields(tmp_path):
    path = tmp_path / "lacking.jsonl"
    path.write_text('{"question": "a", "answer": "x\\n#### 1"}\n\n{"question": "b"}\n')
    with pytest.raises(RecordError, match=r"lacking.jsonl: record 1 \(line 3\) lacks field 'answer'; gsm8k records "
                                          r"need \{'question', 'answer' ending in '#### <number>'\}, found fields "
                                          r"\['question'\]"):
        math_task(path, format="gsm8k")
    write_jsonl(path, [{"problem": "p", "answer": "1"}, {"title": "t", "answer": "2"}])
    with pytest.raises(RecordError, match=r"record 1 \(line 2\) lacks field 'problem'; aime records need "
                                          r"\{'problem' or 'question', 'answer' or 'solution'\}"):
        math_task(path)
    write_jsonl(path, [{"question": "q", "answer": "no final line"}])
    with pytest.raises(RecordError, match=r"record 0 \(line 1\) field 'answer' has no '#### <number>' final line"):
        math_task(path, format="gsm8k")
    write_jsonl(path, [{"prompt": [{"role": "system", "content": "s"}], "reward_model": {"ground_truth": "1"}}])
    with pytest.raises(RecordError, match="record 0 .* has no message with role 'user'"):
        math_task(path)
    write_jsonl(path, [{"prompt": "q", "reward_model": {"style": "rule"}}])
    with pytest.raises(RecordError, match="record 0 .* 'reward_model' must be a dict with 'ground_truth'"):
        math_task(path)
    write_jsonl(path, [["not", "an", "object"]])
    with pytest.raises(RecordError, match="cannot tell the format from the first record"):
        math_task(path)
    with pytest.raises(RecordError, match=r"record 0 \(line 1\) is a list, not an object"):
        math_task(path, format="aime")
    write_jsonl(path, [{"problem": "p", "solution": "no answer in here"}])
    with pytest.raises(RecordError, match=r"field 'solution' has no \\boxed\{\} or final number"):
        math_task(path)


def test_bad_math_configs(tmp_path):
    with pytest.raises(ValueError, match="task 'math' needs 'path'"):
        build_task({"name": "math", "tokenizer": "byte"})
    with pytest.raises(ValueError, match="task 'math' needs 'tokenizer'"):
        build_task({"name": "math", "path": str(SAMPLE)})
    with pytest.raises(ValueError, match=r"unknown prompt format 'gsm8K'; known formats: \['aime', 'dapo', 'gsm8k', "
                                         r"'auto'\]"):
        math_task(SAMPLE, format="gsm8K")
    with pytest.raises(ValueError, match="template must contain '{question}'"):
        math_task(SAMPLE, template="Solve it.")
    with pytest.raises(ValueError, match="chat=True needs a tokenizer with a chat template"):
        math_task(SAMPLE, chat=True)
    with pytest.raises(ValueError, match=r"task 'math' has no 'test' split: set 'eval_path'"):
        PromptStream(math_task(SAMPLE), seed=0, split="test").next_batch(1)
    with pytest.raises(ValueError, match=r"unsupported extension '.csv'; supported: \['.json', '.jsonl', '.parquet'\]"):
        (tmp_path / "a.csv").write_text("q,a\n")
        math_task(tmp_path / "a.csv")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(RecordError, match="holds no records"):
        math_task(tmp_path / "empty.jsonl")
    with pytest.raises(TypeError, match=r"lacks \['encode', 'decode', 'vocab_size', 'pad_id', 'eos_id'\]"):
        build_task({"name": "math", "path": str(SAMPLE), "tokenizer": object()})


# ---------------------------------------------------------------------------------------------
# Hugging Face tokenizer adapter (a tiny tokenizer written locally; nothing is downloaded)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_hf_tokenizer(tmp_path_factory):
    pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    words = ["<pad>", "<eos>", "<unk>", "user", "assistant", "A", "baker", "what", "is", "\\boxed{}."]
    core = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    core.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}assistant {% endif %}")
    path = tmp_path_factory.mktemp("tiny_tok")
    tok.save_pretrained(path)
    return str(path)


def test_hf_tokenizer_adapter(tiny_hf_tokenizer):
    tok = HFTokenizer(tiny_hf_tokenizer)
    assert tok._tok is None  # nothing loads until first use
    assert (tok.vocab_size, tok.pad_id, tok.eos_id) == (10, 0, 1)
    assert tok.encode("what is") == [7, 8]
    assert tok.decode([7, 8, 1, 0]) == "what is"
    assert tok.encode_chat([{"role": "user", "content": "what is"}]) == [3, 7, 8, 4]
    task = build_task({"name": "math", "path": str(SAMPLE), "tokenizer": tiny_hf_tokenizer, "chat": True,
                       "template": "what is {question}"})
    prompt = PromptStream(task, seed=0).next_batch(1)[0]
    assert prompt.ids[:3] == [3, 7, 8] and prompt.ids[-1] == 4
    assert prompt.meta["messages"] == [{"role": "user", "content": prompt.text}]


def test_hf_tokenizer_bad_path(tmp_path):
    pytest.importorskip("transformers")
    with pytest.raises(ValueError, match="could not load a Hugging Face tokenizer from '.*no_model'"):
        HFTokenizer(str(tmp_path / "no_model")).encode("x")
