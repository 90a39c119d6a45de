"""A real word-level tokenizer (HF ``tokenizers``) over the closed vocabulary of the synthetic tasks.

Special tokens have fixed ids so recipes can name them (``ModelConfig.placeholder_ids = {"vision": 3, ...}``); the
tokenizer is saved to the workdir as tokenizer.json, the file format Hugging Face tools read.
"""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer, models, pre_tokenizers

PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
IMAGE, AUDIO = "<image>", "<audio>"
USER, ASSISTANT, UNK = "<user>", "<assistant>", "<unk>"
# Order fixes the ids: <pad>=0 <bos>=1 <eos>=2 <image>=3 <audio>=4 <user>=5 <assistant>=6 <unk>=7.
SPECIAL_TOKENS = (PAD, BOS, EOS, IMAGE, AUDIO, USER, ASSISTANT, UNK)
PLACEHOLDER_TOKENS = {"vision": IMAGE, "audio": AUDIO}

COLOURS = ("red", "green", "blue", "yellow", "magenta", "cyan")
SHAPES = ("circle", "square", "triangle")
ROWS = ("top", "middle", "bottom")
COLS = ("left", "center", "right")
# A video's caption: "a red circle moving leftward". Words of their own: "left" / "right" are also an image's column
# words, and with images in the stream the LLM then learned to say them from the place, not the motion.
MOTIONS = ("leftward", "rightward", "upward", "downward")
TONES_HZ = (220, 330, 440, 550, 660, 880)
NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty twenty-one twenty-two twenty-three"
).split()
FILLER_WORDS = (
    "a", "at", "the", "hz", "tone", "describe", "image", "what", "do", "you", "hear", "count", "from", ":", "?", ".",
)


def vocabulary() -> list[str]:
    words = list(SPECIAL_TOKENS) + list(FILLER_WORDS) + list(COLOURS) + list(SHAPES) + list(ROWS) + list(COLS)
    words += [str(hz) for hz in TONES_HZ] + list(NUMBER_WORDS)
    # Appended, so the ids of the words above stay as they were: "up" / "down" were the first motion words and keep
    # their ids (70, 71; unused now); the video prompt is "<image> describe the video .".
    words += ["moving", "left", "right", "up", "down"] + list(MOTIONS) + ["video"]
    seen, out = set(), []
    for w in words:
        if w not in seen:
            seen.add(w)
            out.append(w)
    return out


def build_tokenizer() -> Tokenizer:
    vocab = {w: i for i, w in enumerate(vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(list(SPECIAL_TOKENS))
    return tok


class TextCodec:
    """Encodes/decodes the synthetic language; a thin cached wrapper around the ``tokenizers`` object."""

    def __init__(self, tokenizer: Tokenizer | None = None):
        self.tokenizer = tokenizer or build_tokenizer()
        self.vocab_size = self.tokenizer.get_vocab_size()
        self._cache: dict[str, np.ndarray] = {}

    def token_id(self, token: str) -> int:
        i = self.tokenizer.token_to_id(token)
        if i is None:
            raise ValueError(f"token {token!r} is not in the synthetic vocabulary")
        return i

    def encode(self, text: str) -> np.ndarray:
        ids = self._cache.get(text)
        if ids is None:
            ids = np.asarray(self.tokenizer.encode(text).ids, np.int32)
            if (ids == self.token_id(UNK)).any():
                raise ValueError(f"text {text!r} has words outside the synthetic vocabulary")
            self._cache[text] = ids
        return ids

    def decode(self, ids) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def pad_id(self) -> int:
        return self.token_id(PAD)

    def placeholder_ids(self) -> dict[str, int]:
        return {name: self.token_id(tok) for name, tok in PLACEHOLDER_TOKENS.items()}
