"""Conversations with images and audio -> batches in the docs/contracts.md format.

Each media part becomes a run of its modality's placeholder id, as long as the features the encoder + projector
produce for it (``ModelConfig.features_per_instance``), and its raw data becomes one encoder input row. Rows are packed greedily
with whole samples (segments); labels are the next token within a segment, kept only where that token is trained.
Encoder rows are laid out sample-major per batch row (row b owns rows b*K .. b*K+K-1 of each modality, K = the
``instances`` budget), so splitting the batch along B splits the encoder inputs the same way.

Gemma 3 (a "gemma3" projector): each image becomes Gemma3Processor's text (``<start_of_image>``, the image tokens,
``<end_of_image>``, and with pan-and-scan one more run per crop), tokenised with the text around it; each image and crop
is one encoder row (processor/gemma3.py).

Span ids: each media instance gets its own span (its tokens attend each other both ways, docs/architecture.md) unless
``bidirectional_media=False``: pretrained LLaVA-style checkpoints were trained with a plain causal mask, and span id 0
reproduces that exactly.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mllm_jax.batch import IGNORE
from mllm_jax.data.batching import encoder_input_shape
from mllm_jax.data.processor.audio import WhisperFeatures
from mllm_jax.data.processor.chat import ChatTemplate, get_template
from mllm_jax.data.processor.gemma3 import Gemma3ImageProcessor, Gemma3Prompt, expand_text_pieces
from mllm_jax.data.processor.image import ImageProcessor


@dataclasses.dataclass
class EncodedSample:
    ids: np.ndarray  # int32 [L]
    train: np.ndarray  # bool [L]: this token is a prediction target
    media: list  # [(modality, encoder input array, start index in ids)]


class MultimodalProcessor:
    def __init__(self, tokenizer, model_config, *, template: str | ChatTemplate = "plain",
                 encoder_processors: dict | None = None, bidirectional_media: bool = True):
        """``tokenizer`` has ``encode(text) -> ids`` (processor.tokenizer.Tokenizer or alike). ``encoder_processors``
        maps modality -> callable(raw) -> encoder input; by default derived from each encoder's config."""
        self.tokenizer = tokenizer
        self.config = model_config
        self.template = get_template(template)
        self.bidirectional_media = bidirectional_media
        self.counts = {name: model_config.features_per_instance(name) for name in model_config.encoders}
        missing = sorted(set(model_config.encoders) - set(model_config.placeholder_ids))
        if missing:
            raise ValueError(f"ModelConfig.placeholder_ids has no id for modalities {missing}")
        self.encoder_processors = dict(encoder_processors or {})
        for name in model_config.encoders:
            if name not in self.encoder_processors:
                self.encoder_processors[name] = default_processor(model_config, name)
        # modality -> Gemma3Prompt: a "gemma3" projector's images are framed and cropped as Gemma3Processor does
        self.prompts = {name: Gemma3Prompt.for_model(model_config, tokenizer, name) for name in model_config.encoders
                        if _projector_kind(model_config, name) == "gemma3"}
        for name in self.prompts:
            want, got = encoder_input_shape(model_config.encoders[name]), tuple(self.encoder_processors[name].shape)
            if got != want:
                raise ValueError(f"encoder_processors[{name!r}] makes rows of shape {got}; the {name!r} tower takes "
                                 f"{want}")

    def encode(self, messages, *, add_generation_prompt: bool = False) -> EncodedSample:
        pieces = self.template.render(messages, add_generation_prompt=add_generation_prompt)
        framed = {}  # modality -> its images' rows, in order, once their text is in the pieces (Gemma 3)
        for name, prompt in self.prompts.items():
            pieces, framed[name] = expand_text_pieces(pieces, prompt, self.encoder_processors[name], name)
        ids, train, media = [], [], []
        for piece in pieces:
            if piece.modality is None:
                toks = self.tokenizer.encode(piece.text)
                ids += toks
                train += [piece.train] * len(toks)
                continue
            if piece.modality not in self.counts:
                raise ValueError(f"the conversation has {piece.modality!r} media but the model has no such encoder; "
                                 f"encoders: {sorted(self.counts)}")
            media.append((piece.modality, self.encoder_processors[piece.modality](piece.data), len(ids)))
            n = self.counts[piece.modality]
            ids += [self.config.placeholder_ids[piece.modality]] * n
            train += [False] * n
        for name, images in framed.items():  # each image and crop: one row, its run found in the tokenised text
            rows = [row for image in images for row in image]
            starts = self.prompts[name].runs(ids, self.config.placeholder_ids[name], len(rows))
            media += [(name, row, start) for row, start in zip(rows, starts)]
        media.sort(key=lambda m: m[2])
        return EncodedSample(np.asarray(ids, np.int32), np.asarray(train, bool), media)

    def __call__(self, conversations, *, seq_len: int, batch_size: int | None = None, instances: dict | None = None,
                 pack: bool = False) -> dict:
        """Conversations -> one batch dict. ``instances[name]`` = encoder rows per batch row (default: the most any
        row needs); ``batch_size`` pads with empty rows (default: as many rows as needed)."""
        samples = [self.encode(c) for c in conversations]
        for i, s in enumerate(samples):
            if len(s.ids) > seq_len:
                raise ValueError(f"sample {i} has {len(s.ids)} tokens, more than seq_len={seq_len}")
        rows = _pack(samples, seq_len) if pack else [[i] for i in range(len(samples))]
        if batch_size is not None and len(rows) > batch_size:
            raise ValueError(f"{len(samples)} samples need {len(rows)} rows of {seq_len} tokens; batch_size={batch_size}")
        b = batch_size or len(rows)
        per_row = {name: [sum(1 for i in row for m in samples[i].media if m[0] == name) for row in rows]
                   for name in self.counts}
        k = {name: max(per_row[name], default=0) for name in self.counts}
        if instances is not None:
            for name, budget in instances.items():
                over = [r for r, n in enumerate(per_row.get(name, [])) if n > budget]
                if over:
                    raise ValueError(f"row {over[0]} holds {per_row[name][over[0]]} {name!r} instances; the budget "
                                     f"instances[{name!r}] is {budget}")
                k[name] = budget
        batch = {key: np.zeros((b, seq_len), np.int32) for key in ("input_ids", "positions", "segment_ids", "span_ids")}
        batch["labels"] = np.full((b, seq_len), IGNORE, np.int32)
        feature_index = {name: np.full((b, seq_len), -1, np.int32) for name in self.counts}
        encoder_inputs = {name: np.zeros((b * k[name], *self.encoder_processors[name].shape), np.float32)
                          for name in self.counts}
        for r, row in enumerate(rows):
            cursor, span, used = 0, 0, dict.fromkeys(self.counts, 0)
            for seg, i in enumerate(row, start=1):
                s = samples[i]
                n = len(s.ids)
                sl = slice(cursor, cursor + n)
                batch["input_ids"][r, sl] = s.ids
                batch["positions"][r, sl] = np.arange(n)
                batch["segment_ids"][r, sl] = seg
                # next-token target inside the segment, only where that next token is trained
                target_ok = np.append(s.train[1:], False)
                batch["labels"][r, sl] = np.where(target_ok, np.append(s.ids[1:], 0), IGNORE)
                for name, data, start in s.media:
                    t = self.counts[name]
                    slot = r * k[name] + used[name]
                    used[name] += 1
                    encoder_inputs[name][slot] = data
                    run = slice(cursor + start, cursor + start + t)
                    feature_index[name][r, run] = slot * t + np.arange(t)
                    if self.bidirectional_media:
                        span += 1
                        batch["span_ids"][r, run] = span
                cursor += n
        batch["encoder_inputs"] = encoder_inputs
        batch["feature_index"] = feature_index
        return batch


def default_processor(model_config, name: str):
    """The encoder-input processor of modality ``name``: Whisper log-mel for audio, Gemma3ImageProcessor for a
    tower under a "gemma3" projector, else the CLIP/SigLIP ImageProcessor of its VisionConfig."""
    enc = model_config.encoders[name]
    if hasattr(enc, "n_mels"):
        return WhisperFeatures.for_model(enc)
    if _projector_kind(model_config, name) == "gemma3":
        return Gemma3ImageProcessor.for_model(enc)
    return ImageProcessor.for_model(enc)


def _projector_kind(model_config, name: str):
    proj = model_config.projectors.get(name)
    return None if proj is None else proj.kind


def _pack(samples, seq_len: int) -> list[list[int]]:
    """First-fit in input order: each row holds whole samples whose lengths sum to at most seq_len."""
    rows, free = [], []
    for i, s in enumerate(samples):
        n = len(s.ids)
        for r, room in enumerate(free):
            if n <= room:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(seq_len - n)
    return rows
