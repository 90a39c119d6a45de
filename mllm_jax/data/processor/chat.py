"""Chat templates as data: per-role text around each message, rendered into pieces that remember which tokens are
trained (the assistant's answers and their end-of-turn marker) and where media goes.

A conversation is a list of {"role": "system"|"user"|"assistant", "content": str | [part, ...]} where a part is
{"type": "text", "text": str}, {"type": "image", "image": PIL | array} or {"type": "audio", "audio": waveform}.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

from mllm_jax.data.tokenizer import ASSISTANT, BOS, EOS, USER

ROLES = ("system", "user", "assistant")
MEDIA_TYPES = {"image": "vision", "audio": "audio"}  # message part type -> modality name (ModelConfig keys)


class Piece(NamedTuple):
    """Text to tokenize, or one media instance (modality, raw data); ``train`` marks answer tokens."""

    text: str | None
    modality: str | None
    data: object
    train: bool


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    bos: str = ""
    prefix: dict = dataclasses.field(default_factory=dict)  # role -> text before the content
    suffix: dict = dataclasses.field(default_factory=dict)  # role -> text after the content (assistant's is trained)
    default_system: str | None = None

    def render(self, messages, *, add_generation_prompt: bool = False) -> list[Piece]:
        pieces = [Piece(self.bos, None, None, False)] if self.bos else []
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        for i, msg in enumerate(messages):
            role = msg.get("role")
            if role not in ROLES:
                raise ValueError(f"message {i}: role must be one of {ROLES}; got {role!r}")
            answer = role == "assistant"
            pieces.append(Piece(self.prefix.get(role, ""), None, None, False))
            pieces.extend(_content_pieces(msg["content"], answer, i))
            pieces.append(Piece(self.suffix.get(role, ""), None, None, answer))
        if add_generation_prompt:
            pieces.append(Piece(self.prefix.get("assistant", ""), None, None, False))
        return [p for p in pieces if p.modality is not None or p.text]


def _content_pieces(content, answer: bool, index: int) -> list[Piece]:
    if isinstance(content, str):
        return [Piece(content, None, None, answer)]
    out = []
    for part in content:
        kind = part.get("type")
        if kind == "text":
            out.append(Piece(part["text"], None, None, answer))
        elif kind in MEDIA_TYPES:
            if answer:
                raise ValueError(f"message {index}: media in an assistant message is not supported (it is not predicted)")
            out.append(Piece(None, MEDIA_TYPES[kind], part[kind], False))
        else:
            raise ValueError(f"message {index}: part type must be 'text', 'image' or 'audio'; got {kind!r}")
    return out


TEMPLATES = {
    # LLaVA-1.5 (vicuna v1): "USER: <image>\n... ASSISTANT: ...</s>"
    "llava": ChatTemplate(
        bos="<s>",
        prefix={"system": "", "user": "USER: ", "assistant": "ASSISTANT: "},
        suffix={"system": " ", "user": " ", "assistant": "</s>"},
    ),
    # Qwen / ChatML
    "chatml": ChatTemplate(
        prefix={r: f"<|im_start|>{r}\n" for r in ROLES},
        suffix={"system": "<|im_end|>\n", "user": "<|im_end|>\n", "assistant": "<|im_end|>"},
    ),
    "llama3": ChatTemplate(
        bos="<|begin_of_text|>",
        prefix={r: f"<|start_header_id|>{r}<|end_header_id|>\n\n" for r in ROLES},
        suffix={r: "<|eot_id|>" for r in ROLES},
    ),
    "gemma": ChatTemplate(
        bos="<bos>",
        prefix={"user": "<start_of_turn>user\n", "assistant": "<start_of_turn>model\n", "system": "<start_of_turn>user\n"},
        suffix={"user": "<end_of_turn>\n", "assistant": "<end_of_turn>", "system": "\n"},
    ),
    # The synthetic vocabulary's markers (mllm_jax.data.tokenizer): "<bos> <user> ... <assistant> ... <eos>".
    "synthetic": ChatTemplate(bos=BOS, prefix={"user": USER, "assistant": ASSISTANT}, suffix={"assistant": EOS}),
    # No markers: prompt and answer concatenated (captioning-style pretraining).
    "plain": ChatTemplate(suffix={"user": " "}),
}


def get_template(template: str | ChatTemplate) -> ChatTemplate:
    if isinstance(template, ChatTemplate):
        return template
    if template not in TEMPLATES:
        raise ValueError(f"unknown chat template {template!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[template]
