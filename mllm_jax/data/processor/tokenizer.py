"""Tokenizers from local Hugging Face files: tokenizer.json through the ``tokenizers`` library (no transformers)."""

from __future__ import annotations

import os


class Tokenizer:
    """Text -> ids without adding special tokens (the chat template writes them as text, e.g. "<s>")."""

    def __init__(self, hf_tokenizer):
        self._tok = hf_tokenizer

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def decode(self, ids) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_to_id(self, token: str) -> int:
        tid = self._tok.token_to_id(token)
        if tid is None:
            raise ValueError(f"token {token!r} is not in the tokenizer's vocabulary")
        return int(tid)

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size(with_added_tokens=True))


def load_tokenizer(path: str) -> Tokenizer:
    """``path`` is a tokenizer.json file or a directory holding one (what save_pretrained writes)."""
    from tokenizers import Tokenizer as HFTokenizer

    file = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
    if not os.path.isfile(file):
        raise ValueError(f"tokenizer file not found: {file} (only the fast-tokenizer tokenizer.json format is read)")
    return Tokenizer(HFTokenizer.from_file(file))
