"""Conversation -> token ids with placeholder runs and a target mask (by default the "synthetic" chat template of
mllm_jax.data.processor.chat).

Layout, as the synthetic data of mllm_jax.data lays out one exchange, extended to several turns:

    <bos> <user> {human text} <assistant> {gpt text} <eos> <user> {human text} <assistant> {gpt text} <eos> ...

Targets are the gpt text and its closing <eos>. Each placeholder string (``<image>``) in the text becomes a run of
the modality's feature count of its placeholder id; placeholders are never targets.

A Gemma 3 model (a "gemma3" projector) sees each image framed and cropped as Gemma3Processor frames it:
``Gemma3ConversationEncoder`` encodes the turns exactly as MultimodalProcessor encodes the same conversation.
"""

from __future__ import annotations

import re

import numpy as np

from mllm_jax.data.tokenizer import PLACEHOLDER_TOKENS
from mllm_jax.data.processor.chat import MEDIA_TYPES, ChatTemplate, get_template
from mllm_jax.data.processor.gemma3 import Gemma3Prompt, frame_pieces

ROLES = {"human": "user", "gpt": "assistant"}  # LLaVA conversation roles -> chat template roles


def encode_fn(tokenizer):
    """A text -> int32 ids function for a ``tokenizers.Tokenizer`` (no special tokens added) or anything with
    ``encode(text)`` returning ids (mllm_jax.data.TextCodec)."""
    try:
        from tokenizers import Tokenizer
    except ImportError:  # pragma: no cover - tokenizers is a requirement
        Tokenizer = ()
    if isinstance(tokenizer, Tokenizer):
        return lambda text: np.asarray(tokenizer.encode(text, add_special_tokens=False).ids, np.int32)
    if hasattr(tokenizer, "encode"):
        return lambda text: np.asarray(tokenizer.encode(text), np.int32).reshape(-1)
    if callable(tokenizer):
        return lambda text: np.asarray(tokenizer(text), np.int32).reshape(-1)
    raise ValueError(f"tokenizer must be a tokenizers.Tokenizer, have .encode(text) or be callable; got "
                     f"{type(tokenizer).__name__}")


class ConversationEncoder:
    """Encodes [(role, text)] turns. ``feature_counts[name]`` is the run length per instance of modality ``name``,
    ``placeholder_ids[name]`` its token id (ModelConfig.placeholder_ids), ``placeholders[name]`` the string that marks
    an instance in the text (``<image>``); ``aliases`` more strings for a modality ({"<video>": "vision"}). A
    modality whose count is None (native resolution: each instance its own grid) takes each run's length from
    ``encode_turns(..., run_lengths=)``. The template's markers are tokenised with the same tokenizer as the text."""

    def __init__(self, tokenizer, placeholder_ids: dict, feature_counts: dict,
                 template: ChatTemplate | str = "synthetic", placeholders: dict = PLACEHOLDER_TOKENS,
                 aliases: dict | None = None):
        self.encode = encode_fn(tokenizer)
        self.template = template = get_template(template)
        self.placeholder_ids = dict(placeholder_ids)
        self.feature_counts = dict(feature_counts)
        self.placeholder_strings = {name: s for name, s in placeholders.items() if name in self.feature_counts}
        missing = [n for n in self.feature_counts if n not in self.placeholder_strings or n not in self.placeholder_ids]
        if missing:
            raise ValueError(f"no placeholder string or id for modalities {missing}; placeholders "
                             f"{dict(placeholders)}, placeholder_ids {self.placeholder_ids}")
        by_string = {s: n for n, s in self.placeholder_strings.items()}
        for string, name in (aliases or {}).items():
            if name not in self.feature_counts:
                raise ValueError(f"placeholder alias {string!r} names modality {name!r}, which has no count "
                                 f"({sorted(self.feature_counts)})")
            by_string[string] = name
        self._split = re.compile("(" + "|".join(re.escape(s) for s in by_string) + ")") if by_string else None
        self._by_string = by_string
        encode_marker = lambda text: self.encode(text) if text else np.zeros(0, np.int32)  # noqa: E731
        self._bos = encode_marker(template.bos)
        self._prefix = {r: encode_marker(template.prefix.get(r, "")) for r in ROLES.values()}
        self._suffix = {r: encode_marker(template.suffix.get(r, "")) for r in ROLES.values()}

    def count_placeholders(self, text: str) -> dict:
        return {n: text.count(s) for n, s in self.placeholder_strings.items()}

    def markers(self, turns) -> list:
        """The placeholder strings of ``turns``' texts in order of appearance (each one instance's run)."""
        if self._split is None:
            return []
        return [piece for _, text in turns for piece in self._split.split(text) if piece in self._by_string]

    def encode_turns(self, turns, run_lengths=None):
        """turns: [(role in {"human", "gpt"}, text)] -> (ids [L] int32, target [L] bool, runs [(modality, start)]).
        ``run_lengths``: the length of each run in order of appearance (``markers``), for modalities without a fixed
        count.

        Raises ValueError on an unknown role or a run without a length (callers turn it into a bad sample)."""
        ids, tgt, runs = [self._bos], [np.zeros(len(self._bos), bool)], []
        length = len(self._bos)

        def put(piece, is_target):
            nonlocal length
            ids.append(piece)
            tgt.append(np.full(len(piece), is_target, bool))
            length += len(piece)

        for role, text in turns:
            if role not in ROLES:
                raise ValueError(f"conversation role must be 'human' or 'gpt'; got {role!r}")
            is_gpt = role == "gpt"
            put(self._prefix[ROLES[role]], False)
            pieces = self._split.split(text) if self._split else [text]
            for piece in pieces:
                name = self._by_string.get(piece)
                if name is not None:
                    k = len(runs)
                    n = self.feature_counts[name] if run_lengths is None else run_lengths[k] if k < len(
                        run_lengths) else None
                    if n is None:
                        raise ValueError(f"placeholder {piece!r} (run {k}) has no length: {len(run_lengths or ())} "
                                         f"run lengths given")
                    runs.append((name, length))
                    put(np.full(int(n), self.placeholder_ids[name], np.int32), False)
                elif piece.strip():
                    put(self.encode(piece), is_gpt)
            put(self._suffix[ROLES[role]], is_gpt)  # the answer's end-of-turn marker is trained
        return np.concatenate(ids).astype(np.int32), np.concatenate(tgt), runs


class Gemma3ConversationEncoder:
    """LLaVA turns [(role, text)] -> what MultimodalProcessor.encode makes of the same conversation for a Gemma 3
    model: each ``marker`` (``<image>``) an image part of its message, the chat template rendered into pieces, each
    image Gemma3Processor's text for its crop count (processor.gemma3.frame_pieces: "\\n\\n<start_of_image>", the
    image tokens, "<end_of_image>\\n\\n", one more sequence per crop), adjacent text of one training flag tokenised as
    one string. The crop counts are given (from the images' headers), so no pixel is needed to plan a sample."""

    modality = MEDIA_TYPES["image"]  # the chat template's image parts

    def __init__(self, tokenizer, prompt: Gemma3Prompt, image_token_id: int, template: ChatTemplate | str = "gemma",
                 marker: str = PLACEHOLDER_TOKENS["vision"]):
        self.encode = encode_fn(tokenizer)
        self.template = get_template(template)
        self.prompt, self.image_token_id, self.marker = prompt, int(image_token_id), marker

    def count_images(self, turns) -> int:
        return sum(text.count(self.marker) for _, text in turns)

    def messages(self, turns) -> list:
        """The chat messages of LLaVA turns; image parts hold their index in order of appearance."""
        out, k = [], 0
        for role, text in turns:
            if role not in ROLES:
                raise ValueError(f"conversation role must be 'human' or 'gpt'; got {role!r}")
            parts = []
            for j, piece in enumerate(text.split(self.marker)):
                if j:
                    parts.append({"type": "image", "image": k})
                    k += 1
                if piece:
                    parts.append({"type": "text", "text": piece})
            out.append({"role": ROLES[role], "content": parts})
        return out

    def encode_turns(self, turns, num_crops):
        """turns, the crop count of each image in order -> (ids [L] int32, target [L] bool, the start of each image
        and crop's run of ``prompt.tokens_per_image`` image tokens, in order). ValueError for an unknown role, an
        image in a gpt turn, a text holding a Gemma 3 marker, or a count of images other than ``len(num_crops)``."""
        messages = self.messages(turns)
        if self.count_images(turns) != len(num_crops):
            raise ValueError(f"{self.count_images(turns)} {self.marker} markers but {len(num_crops)} crop counts")
        pieces = frame_pieces(self.template.render(messages), self.prompt, lambda k: num_crops[k], self.modality)
        ids, tgt = [np.zeros(0, np.int32)], [np.zeros(0, bool)]
        for piece in pieces:  # all text now: the images are in it
            toks = self.encode(piece.text)
            ids.append(toks)
            tgt.append(np.full(len(toks), piece.train, bool))
        ids = np.concatenate(ids).astype(np.int32)
        starts = self.prompt.runs(ids, self.image_token_id, sum(1 + int(n) for n in num_crops))
        return ids, np.concatenate(tgt), starts
