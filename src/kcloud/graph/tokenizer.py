"""Text in and out of an LLM: the tokenizer (and chat template) a served model uses.

Zoo LLMs with random weights get a byte-level tokenizer: each UTF-8 byte is a token (ids
0-255), then a few special tokens; any text round-trips. A Hugging Face directory uses its own
`tokenizer.json` and the chat template of its `tokenizer_config.json`, loaded offline with
`transformers` (local files only, no remote code).
"""

from __future__ import annotations

import functools
from typing import Any, Protocol

from kcloud.errors import KCloudError
from kcloud.graph import hf, zoo

BYTE_SPECIALS = ("<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>")


class Tokenizer(Protocol):
    eos_id: int | None
    vocab: int

    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int]) -> str: ...
    def chat(self, messages: list[dict[str, str]]) -> list[int]: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens 0-255, then `BYTE_SPECIALS`."""

    def __init__(self, vocab: int) -> None:
        if vocab < 256 + len(BYTE_SPECIALS):
            raise KCloudError(f"a byte-level tokenizer needs a vocabulary of at least "
                              f"{256 + len(BYTE_SPECIALS)}, the model has {vocab}",
                              "serve a model with a larger vocabulary")
        self.vocab = vocab
        self.special = {name: 256 + i for i, name in enumerate(BYTE_SPECIALS)}
        self.bos_id = self.special["<|bos|>"]
        self.eos_id: int | None = self.special["<|eos|>"]

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        ids = [self.bos_id]
        for m in messages:
            role = f"<|{m['role']}|>"
            if role not in self.special:
                raise KCloudError(f"unknown chat role '{m['role']}'",
                                  "use system, user or assistant")
            ids += [self.special[role], *self.encode("\n" + m["content"]), self.eos_id or 0,
                    *self.encode("\n")]
        return [*ids, self.special["<|assistant|>"], *self.encode("\n")]


class HFTokenizer:
    """A Hugging Face directory's tokenizer and chat template."""

    def __init__(self, path: str) -> None:
        from transformers import AutoTokenizer

        try:
            self.tok: Any = AutoTokenizer.from_pretrained(path, local_files_only=True,
                                                          trust_remote_code=False)
        except Exception as exc:
            raise KCloudError(f"cannot load the tokenizer of {path}: "
                              f"{' '.join(str(exc).split())[:160]}",
                              "give a directory with tokenizer.json") from None
        self.vocab = len(self.tok)
        self.eos_id = self.tok.eos_token_id

    def encode(self, text: str) -> list[int]:
        return list(self.tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return str(self.tok.decode(ids, skip_special_tokens=True))

    def chat(self, messages: list[dict[str, str]]) -> list[int]:
        if not getattr(self.tok, "chat_template", None):
            raise KCloudError("the model's tokenizer has no chat template",
                              "use /v1/completions with a prompt")
        ids = self.tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]


@functools.cache
def load_tokenizer(model: str) -> Tokenizer:
    """The tokenizer of a zoo LLM (byte-level) or a Hugging Face directory (its own)."""
    if hf.is_hf_dir(model):
        return HFTokenizer(model)
    if zoo.is_zoo_model(model) and zoo.model_info(model).is_llm:
        cfg = zoo._entry(model).config
        assert cfg is not None
        return ByteTokenizer(cfg.vocab)
    raise KCloudError(f"{model} is not a language model", "serve an LLM for text")


def eos_token_id(model: str) -> int | None:
    return load_tokenizer(model).eos_id
