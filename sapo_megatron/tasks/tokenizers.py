"""Tokenizers behind the ``Tokenizer`` protocol: character-level, byte-level, and a lazy HF adapter.

- ``CharTokenizer``: a fixed alphabet plus PAD (id 0) and EOS (id 1). The arithmetic task's
  default alphabet ``"0123456789+-= "`` gives a vocabulary of 16, so a randomly initialised
  policy already emits the right digit now and then.
- ``ByteTokenizer``: UTF-8 bytes 0..255, PAD 256, EOS 257; any text round-trips. For tests and
  tiny models on text prompt sets.
- ``HFTokenizer(path)``: wraps ``transformers.AutoTokenizer.from_pretrained(path)`` and loads it
  on first use, so importing this module never needs ``transformers``.

``decode`` drops PAD/EOS (they have no text) but never stops at them; the caller cuts the
response at EOS first.
"""

from __future__ import annotations

from typing import Any

from .base import Tokenizer

PAD_ID = 0
EOS_ID = 1


class CharTokenizer:
    def __init__(self, alphabet: str = "0123456789+-= "):
        if len(set(alphabet)) != len(alphabet) or not alphabet:
            raise ValueError(f"CharTokenizer alphabet must be non-empty with unique characters, got {alphabet!r}")
        self.alphabet = alphabet
        self.pad_id = PAD_ID
        self.eos_id = EOS_ID
        self._to_id = {ch: i + 2 for i, ch in enumerate(alphabet)}
        self._to_char = {i: ch for ch, i in self._to_id.items()}
        self.vocab_size = len(alphabet) + 2

    def encode(self, text: str) -> list[int]:
        ids = []
        for pos, ch in enumerate(text):
            if ch not in self._to_id:
                raise ValueError(f"CharTokenizer cannot encode {ch!r} at position {pos} of {text!r}; "
                                 f"alphabet is {self.alphabet!r}")
            ids.append(self._to_id[ch])
        return ids

    def decode(self, ids: list[int]) -> str:
        return "".join(self._to_char.get(self._check(i), "") for i in ids)

    def char(self, token_id: int) -> str | None:
        """The character for ``token_id``, or None for PAD/EOS."""
        return self._to_char.get(self._check(token_id))

    def _check(self, token_id: int) -> int:
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"CharTokenizer: token id {token_id} is outside the vocabulary [0, {self.vocab_size})")
        return token_id


class ByteTokenizer:
    vocab_size = 258
    pad_id = 256
    eos_id = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"ByteTokenizer: token id {i} is outside the vocabulary [0, {self.vocab_size})")
        # A sampled response can end mid-character; replace rather than fail.
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face tokenizer from a local directory (or hub id where the network allows it).

    ``encode`` adds no special tokens: prompts that need BOS or a chat wrapper get them from
    ``encode_chat`` (the model's chat template). ``pad_id`` falls back to EOS when the tokenizer
    defines no pad token, as most causal LMs do.
    """

    def __init__(self, path: str):
        self.path = str(path)
        self._tok: Any = None

    @property
    def hf(self) -> Any:
        if self._tok is None:
            try:
                from transformers import AutoTokenizer
            except ImportError as e:
                raise ImportError(f"HFTokenizer({self.path!r}) needs transformers: pip install transformers") from e
            try:
                self._tok = AutoTokenizer.from_pretrained(self.path)
            except Exception as e:
                raise ValueError(f"could not load a Hugging Face tokenizer from {self.path!r}: {e}") from e
            if self._tok.eos_token_id is None:
                raise ValueError(f"the tokenizer at {self.path!r} defines no EOS token; the trainer needs one to stop")
        return self._tok

    @property
    def vocab_size(self) -> int:
        return len(self.hf)  # includes added tokens, unlike hf.vocab_size

    @property
    def eos_id(self) -> int:
        return int(self.hf.eos_token_id)

    @property
    def pad_id(self) -> int:
        pad = self.hf.pad_token_id
        return int(pad) if pad is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=True)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        # Render to text first: apply_chat_template(tokenize=True) changed return type across versions.
        text = self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.encode(text)


BUILTIN_TOKENIZERS = {"char": CharTokenizer, "byte": ByteTokenizer}


def build_tokenizer(spec: Any) -> Tokenizer:
    """``"char"`` / ``"byte"`` -> built-in; any other string -> ``HFTokenizer(spec)``; an object
    with ``encode``/``decode``/``vocab_size``/``pad_id``/``eos_id`` -> used as is."""
    if isinstance(spec, str):
        if spec in BUILTIN_TOKENIZERS:
            return BUILTIN_TOKENIZERS[spec]()
        return HFTokenizer(spec)
    missing = [a for a in ("encode", "decode", "vocab_size", "pad_id", "eos_id") if not hasattr(spec, a)]
    if missing:
        raise TypeError(f"tokenizer {spec!r} lacks {missing}; pass {sorted(BUILTIN_TOKENIZERS)}, a local Hugging "
                        "Face tokenizer path, or an object implementing sapo_megatron.tasks.Tokenizer")
    return spec
