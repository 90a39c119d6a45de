"""File-backed sample sources: the LLaVA conversation JSON (+ image folder) and JSONL audio captions.

A source has ``len``, ``prepare(i) -> PreparedSample`` (cheap: parse, tokenise, check counts, lengths and that the
files exist; the same on every host) and ``materialize(prepared) -> Sample`` (decode the files). Both raise
``BadSampleError`` for bad records.

Untrusted input: a media path (relative or absolute) must stay under the source's media root after normalisation
(``..`` resolved lexically; symlinks inside the root are the root owner's choice and are followed), else the record is
skipped as "path_outside_root" without the file being touched. A dataset file that is not valid UTF-8, or (LLaVA) not
valid JSON, is a ValueError naming the file, line and column; ``read_records`` runs before any model is built.
"""

from __future__ import annotations

import json
import os

import numpy as np

from mllm_jax.data.batching import encoder_input_shape, feature_counts
from mllm_jax.data.datasets import media as media_lib
from mllm_jax.data.datasets.media import DEFAULT_MAX_IMAGE_PIXELS, load_audio, load_image, read_media
from mllm_jax.data.datasets.sample import BadSampleError, Instance, PreparedSample, Sample
from mllm_jax.data.datasets.text import ConversationEncoder, Gemma3ConversationEncoder
from mllm_jax.data import native_pack
from mllm_jax.data.processor.chat import ChatTemplate

VIDEO = "<video>"  # a native-resolution LLaVA record's video placeholder (images: <image>)


def _decode_utf8(path: str, data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise ValueError(f"{path}: line {line}, column {column}: not valid UTF-8 (byte 0x{data[e.start]:02x} at "
                         f"offset {e.start}: {e.reason})") from None


def _parse_records(path: str, fmt: str) -> list:
    if not os.path.isfile(path):
        raise ValueError(f"DatasetConfig.path: dataset file {path!r} does not exist")
    with open(path, "rb") as f:
        text = _decode_utf8(path, f.read())
    if fmt == "llava":
        try:
            records = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: line {e.lineno}, column {e.colno}: invalid JSON: {e.msg}") from None
        if not isinstance(records, list):
            raise ValueError(f"{path}: LLaVA data must be a JSON list of samples; got {type(records).__name__}")
        return records
    records = []
    for line_no, line in enumerate(text.split("\n")):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            # one bad line is one bad record (skipped and counted by the loader's policy), reported by prepare
            records.append({"id": f"line{line_no + 1}", "_error": f"{path}: line {line_no + 1}: invalid JSON: {e}"})
    return records


_PARSED: dict = {}  # (path, size, mtime) -> records, read by read_records ahead of the source that uses them


def _file_key(path: str):
    st = os.stat(path)
    return os.path.abspath(path), st.st_size, st.st_mtime_ns


def read_records(path: str, fmt: str, *, keep: bool = False) -> list:
    """The records of a dataset file (``fmt``: "llava" or "audio_caption"); ValueError naming file and line for a file
    that is not UTF-8 or (LLaVA) not JSON. ``keep``: remember them for the source built next from the same unchanged
    file (the run checks the file before building the model, the loader reads it after, the file is parsed once)."""
    key = _file_key(path) if os.path.isfile(path) else None
    if key is not None and key in _PARSED:
        records = _PARSED[key] if keep else _PARSED.pop(key)
        return records
    records = _parse_records(path, fmt)
    if keep and key is not None:
        _PARSED.clear()
        _PARSED[key] = records
    return records


def check_dataset_file(config) -> int:
    """Read (and keep, for the loader) the dataset file a DatasetConfig names; returns its record count. Errors are
    ValueErrors naming the file and line: call it before building anything expensive."""
    config.validate()
    return len(read_records(config.path, config.format, keep=True))


class _Source:
    modality: str

    def __init__(self, records: list, media_root: str, tokenizer, model_config, *, max_tokens: int,
                 max_instances: int, template: ChatTemplate | str):
        if self.modality not in model_config.encoders:
            raise ValueError(f"{type(self).__name__} needs a {self.modality!r} encoder; the model has "
                             f"{tuple(model_config.encoders)}")
        self.records = records
        self.media_root = media_root
        self.model_config = model_config
        self.max_tokens = int(max_tokens)
        self.max_instances = int(max_instances)
        self.native = model_config.is_native_resolution(self.modality)
        if self.native:  # each instance's run follows its own grid (NativeLlavaSource)
            self.feature_counts, self.instance_shapes = {self.modality: None}, {}
        else:
            self.feature_counts = {self.modality: feature_counts(model_config)[self.modality]}
            self.instance_shapes = {self.modality: encoder_input_shape(model_config.encoders[self.modality])}
        self.encoder = ConversationEncoder(tokenizer, model_config.placeholder_ids, self.feature_counts, template,
                                           aliases={VIDEO: self.modality} if self.native else None)

    @property
    def modalities(self) -> tuple:
        return (self.modality,)

    def __len__(self) -> int:
        return len(self.records)

    def sample_id(self, index: int) -> str:
        rec = self.records[index]
        return str(rec.get("id", index)) if isinstance(rec, dict) else str(index)

    def _media_path(self, path: str, sid: str) -> str:
        """The file a record names, required to stay under the media root (absolute paths too)."""
        root = os.path.abspath(self.media_root)
        full = os.path.normpath(os.path.join(root, path))  # an absolute ``path`` replaces the root here
        if os.path.commonpath([root, full]) != root:
            raise BadSampleError(sid, "path_outside_root", f"media path {path!r} resolves to {full}, outside the "
                                 f"media root {root} (DatasetConfig.media_root)")
        return full

    def _finish(self, sid: str, turns, media: list) -> PreparedSample:
        try:
            ids, target, runs = self.encoder.encode_turns(turns)
        except ValueError as e:
            raise BadSampleError(sid, "malformed_record", str(e)) from None
        if len(runs) != len(media):
            raise BadSampleError(sid, "placeholder_mismatch",
                                 f"{len(runs)} {self.modality!r} placeholders in the text but {len(media)} files")
        if len(media) > self.max_instances:
            raise BadSampleError(sid, "too_many_instances",
                                 f"{len(media)} {self.modality!r} instances, more than the largest bucket's "
                                 f"{self.max_instances} per microbatch")
        if len(ids) > self.max_tokens:
            raise BadSampleError(sid, "too_long", f"{len(ids)} tokens, more than the longest bucket's {self.max_tokens}")
        for p in media:
            if not os.path.isfile(p):
                raise BadSampleError(sid, "missing_file", f"{p} does not exist")
        t = self.feature_counts[self.modality]
        instances = tuple(Instance(name, start, t, p) for (name, start), p in zip(runs, media))
        return PreparedSample(sid, ids, target, instances)


class LlavaSource(_Source):
    """LLaVA instruction data: a JSON list of {"id", "image": str | [str] (optional), "conversations":
    [{"from": "human" | "gpt", "value": "...<image>..."}]}; image paths relative to ``image_folder``."""

    modality = "vision"

    def __init__(self, json_path: str, image_folder: str, tokenizer, model_config, *, max_tokens: int,
                 max_instances: int, template: ChatTemplate | str = "synthetic", mean=(0.5,) * 3, std=(0.5,) * 3,
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
        records = read_records(json_path, "llava")
        super().__init__(records, image_folder or os.path.dirname(os.path.abspath(json_path)), tokenizer,
                         model_config, max_tokens=max_tokens, max_instances=max_instances, template=template)
        self.mean, self.std = tuple(mean), tuple(std)
        self.max_image_pixels = int(max_image_pixels)

    def _record(self, index: int) -> tuple[str, list, list]:
        """(sample id, turns [(from, value)], image files checked to stay under the media root) of a record."""
        rec, sid = self.records[index], self.sample_id(index)
        if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
            raise BadSampleError(sid, "malformed_record", "want a dict with a 'conversations' list")
        images = rec.get("image", [])
        images = [images] if isinstance(images, str) else images
        if not isinstance(images, list) or not all(isinstance(p, str) for p in images):
            raise BadSampleError(sid, "malformed_record", f"'image' must be a path or a list of paths; got {images!r}")
        try:
            turns = [(t["from"], str(t["value"])) for t in rec["conversations"]]
        except (KeyError, TypeError):
            raise BadSampleError(sid, "malformed_record", "each turn needs 'from' and 'value'") from None
        return sid, turns, [self._media_path(p, sid) for p in images]

    def prepare(self, index: int) -> PreparedSample:
        return self._finish(*self._record(index))

    def preprocessing(self) -> dict:
        """What, besides a file's bytes and the encoder's config, decides an instance's encoder input (for the
        feature cache's fingerprint; the image size and channels are the encoder config's)."""
        return {"version": media_lib.PREPROCESSING_VERSION, "image_mean": list(self.mean),
                "image_std": list(self.std)}

    def materialize(self, prepared: PreparedSample) -> Sample:
        h, _, c = self.instance_shapes["vision"]
        inputs, keys = [], []
        for i in prepared.instances:
            data, digest = read_media(i.media, prepared.sample_id)
            inputs.append(load_image(i.media, prepared.sample_id, size=h, mean=self.mean, std=self.std, channels=c,
                                     max_pixels=self.max_image_pixels, data=data))
            keys.append(digest)
        return Sample(prepared, tuple(inputs), tuple(keys))


class AudioCaptionSource(_Source):
    """JSONL of {"audio": path to .wav/.npy, "caption": str} (optional "id"): the human turn is the audio
    placeholder and ``prompt``, the gpt turn the caption."""

    modality = "audio"

    def __init__(self, jsonl_path: str, media_root: str, tokenizer, model_config, *, max_tokens: int,
                 max_instances: int, template: ChatTemplate | str = "synthetic", prompt: str = "Describe the audio."):
        records = read_records(jsonl_path, "audio_caption")
        super().__init__(records, media_root or os.path.dirname(os.path.abspath(jsonl_path)), tokenizer,
                         model_config, max_tokens=max_tokens, max_instances=max_instances, template=template)
        self.placeholder = self.encoder.placeholder_strings["audio"]
        self.prompt = prompt

    def prepare(self, index: int) -> PreparedSample:
        rec, sid = self.records[index], self.sample_id(index)
        if not isinstance(rec, dict) or "_error" in rec:
            raise BadSampleError(sid, "malformed_record", f"not a JSON object: {rec.get('_error', rec)}")
        if not isinstance(rec.get("audio"), str) or not isinstance(rec.get("caption"), str):
            raise BadSampleError(sid, "malformed_record", "want string fields 'audio' and 'caption'")
        if self.placeholder in rec["caption"]:
            raise BadSampleError(sid, "placeholder_mismatch", f"caption contains the placeholder {self.placeholder}")
        turns = [("human", f"{self.placeholder} {self.prompt}"), ("gpt", rec["caption"])]
        return self._finish(sid, turns, [self._media_path(rec["audio"], sid)])

    def preprocessing(self) -> dict:
        """See LlavaSource.preprocessing (frames and mel bins are the encoder config's)."""
        return {"version": media_lib.PREPROCESSING_VERSION}

    def materialize(self, prepared: PreparedSample) -> Sample:
        t, n_mels = self.instance_shapes["audio"]
        inputs, keys = [], []
        for i in prepared.instances:
            data, digest = read_media(i.media, prepared.sample_id)
            inputs.append(load_audio(i.media, prepared.sample_id, n_mels=n_mels, num_frames=t, data=data))
            keys.append(digest)
        return Sample(prepared, tuple(inputs), tuple(keys))


def _as_list(value, sid: str, what: str) -> list:
    value = [value] if isinstance(value, str) else value if value is not None else []
    if not isinstance(value, list) or not all(isinstance(p, str) for p in value):
        raise BadSampleError(sid, "malformed_record", f"{what!r} must be a path or a list of paths; got {value!r}")
    return value


def native_processor(model_config, name: str, processor_path: str = ""):
    """The NativeVisionProcessor of modality ``name``: from a Hugging Face processor directory (its
    preprocessor_config.json) when ``processor_path`` names one, else the model's NativeVisionConfig. A directory
    whose patch sizes differ from the tower's is a ValueError naming both."""
    from mllm_jax.data.processor.native_vision import NativeVisionProcessor

    enc = model_config.encoders[name]
    if not processor_path:
        return NativeVisionProcessor.for_model(enc)
    proc = NativeVisionProcessor.from_pretrained(processor_path)
    want = (enc.patch_size, enc.temporal_patch_size, enc.spatial_merge_size)
    got = (proc.patch_size, proc.temporal_patch_size, proc.merge_size)
    if got != want:
        raise ValueError(f"DatasetConfig.processor_path={processor_path!r}: (patch_size, temporal_patch_size, "
                         f"merge_size) = {got}, but the {name!r} tower has {want}")
    return proc


class NativeLlavaSource(LlavaSource):
    """LLaVA JSON for a native-resolution vision tower (NativeVisionConfig, docs/native_resolution.md): images at
    their own size and videos, through the Qwen2-VL processor. A record: {"id", "image": path | [paths],
    "video": path | [paths] (a folder of frame images, sorted by file name, or a .npy uint8 [T, H, W, 3]),
    "fps": the videos' frame rate (optional; default DatasetConfig.video_fps, 0 = unknown: every frame kept),
    "conversations": [...]}; the text's ``<image>`` marks the images in order, ``<video>`` the videos in order.

    ``prepare`` reads only headers (image size; a video's frame count and size) to know each instance's grid, its
    placeholder run (t*h*w / merge_size**2 tokens), the frames a video keeps and its patch count, so every host
    plans the same batches; ``materialize`` decodes the pixels (only a video's kept frames) through the processor."""

    def __init__(self, json_path: str, image_folder: str, tokenizer, model_config, *, max_tokens: int,
                 max_rows: int, template: ChatTemplate | str = "synthetic",
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, video_fps: float = 0.0, processor_path: str = ""):
        super().__init__(json_path, image_folder, tokenizer, model_config, max_tokens=max_tokens,
                         max_instances=max_rows, template=template, max_image_pixels=max_image_pixels)
        self.enc = model_config.encoders[self.modality]
        self.processor = native_processor(model_config, self.modality, processor_path)
        self.video_fps = float(video_fps)
        self.processor_path = processor_path
        self.max_rows = int(max_rows)  # patch rows per data rank and microbatch (the largest instance bucket)

    def _instance_plan(self, sid: str, path: str, video: bool, fps) -> dict:
        """Instance fields from the file's header: grid, kept frames, seconds per grid."""
        try:
            if not video:
                h, w = media_lib.image_size(path, sid, max_pixels=self.max_image_pixels)
                return dict(grid=native_pack.image_grid(self.processor, h, w))
            n, h, w, files = media_lib.video_header(path, sid, max_pixels=self.max_image_pixels)
            keep, grid, spg = native_pack.video_plan(self.processor, n, h, w, fps)
        except ValueError as e:  # the processor's refusals: an aspect ratio above 200, too few frames to sample
            if isinstance(e, BadSampleError):
                raise
            raise BadSampleError(sid, "bad_video" if video else "bad_image_size", f"{path}: {e}") from None
        return dict(grid=grid, video=True, frames=tuple(int(k) for k in keep), frame_files=files,
                    seconds_per_grid=float(spg))

    def prepare(self, index: int) -> PreparedSample:
        rec, sid = self.records[index], self.sample_id(index)
        if not isinstance(rec, dict) or not isinstance(rec.get("conversations"), list):
            raise BadSampleError(sid, "malformed_record", "want a dict with a 'conversations' list")
        images, videos = _as_list(rec.get("image"), sid, "image"), _as_list(rec.get("video"), sid, "video")
        fps = rec.get("fps", self.video_fps)
        if isinstance(fps, bool) or not isinstance(fps, (int, float)) or fps < 0:
            raise BadSampleError(sid, "malformed_record", f"'fps' must be a non-negative number; got {fps!r}")
        try:
            turns = [(t["from"], str(t["value"])) for t in rec["conversations"]]
        except (KeyError, TypeError):
            raise BadSampleError(sid, "malformed_record", "each turn needs 'from' and 'value'") from None
        markers = self.encoder.markers(turns)
        image_marker = self.encoder.placeholder_strings[self.modality]
        n_img, n_vid = markers.count(image_marker), markers.count(VIDEO)
        if (n_img, n_vid) != (len(images), len(videos)):
            raise BadSampleError(sid, "placeholder_mismatch", f"{n_img} {image_marker} and {n_vid} {VIDEO} "
                                 f"placeholders in the text but {len(images)} images and {len(videos)} videos")
        paths = iter([self._media_path(p, sid) for p in images]), iter([self._media_path(p, sid) for p in videos])
        media = [next(paths[m == VIDEO]) for m in markers]  # in order of appearance
        for p in media:
            if not os.path.exists(p):
                raise BadSampleError(sid, "missing_file", f"{p} does not exist")
        plans = [self._instance_plan(sid, p, m == VIDEO, float(fps) or None) for p, m in zip(media, markers)]
        counts = [int(np.prod(pl["grid"])) for pl in plans]
        p_row = self.enc.patches_per_row
        for pl, n, path in zip(plans, counts, media):
            if n > p_row:
                raise BadSampleError(sid, "instance_too_large",
                                     f"{path}: grid (t, h, w) = {pl['grid']} has {n} patches, more than a packed row "
                                     f"holds (NativeVisionConfig.patches_per_row = {p_row})")
        if native_pack.rows_needed(counts, self.enc) > self.max_rows:
            raise BadSampleError(sid, "too_many_instances",
                                 f"its {len(counts)} instances of {counts} patches need "
                                 f"{native_pack.rows_needed(counts, self.enc)} patch rows of {p_row}, more than the "
                                 f"largest bucket's {self.max_rows} (DatasetConfig.instance_buckets)")
        lengths = [native_pack.instance_tokens(pl["grid"], self.enc.spatial_merge_size) for pl in plans]
        try:
            ids, target, runs = self.encoder.encode_turns(turns, run_lengths=lengths)
        except ValueError as e:
            raise BadSampleError(sid, "malformed_record", str(e)) from None
        if len(ids) > self.max_tokens:
            raise BadSampleError(sid, "too_long", f"{len(ids)} tokens, more than the longest bucket's {self.max_tokens}")
        instances = tuple(Instance(name, start, n, p, **pl)
                          for (name, start), n, p, pl in zip(runs, lengths, media, plans))
        return PreparedSample(sid, ids, target, instances)

    def preprocessing(self) -> dict:
        return {"version": media_lib.PREPROCESSING_VERSION, "processor": repr(self.processor)}

    def materialize(self, prepared: PreparedSample) -> Sample:
        """Each instance through the processor (a NativeInstance), its grid checked against the planned one."""
        sid, out, keys = prepared.sample_id, [], []
        for inst in prepared.instances:
            if inst.video:
                frames, digest = media_lib.decode_video_frames(inst, sid, max_pixels=self.max_image_pixels)
                try:  # the kept frames alone: the processor samples nothing more
                    x = self.processor.video(frames)._replace(seconds_per_grid=inst.seconds_per_grid)
                except ValueError as e:
                    raise BadSampleError(sid, "bad_video", f"{inst.media}: {e}") from None
            else:
                data, digest = read_media(inst.media, sid)
                rgb = media_lib.decode_rgb(inst.media, sid, max_pixels=self.max_image_pixels, data=data)
                try:
                    x = self.processor.image(rgb)
                except ValueError as e:
                    raise BadSampleError(sid, "bad_image_size", f"{inst.media}: {e}") from None
            if tuple(x.grid_thw) != tuple(inst.grid):
                raise BadSampleError(sid, "grid_mismatch", f"{inst.media}: decoded to grid {tuple(x.grid_thw)}, but "
                                     f"its header planned {tuple(inst.grid)} (a file changed since, or frames of "
                                     f"another size)")
            out.append(x)
            keys.append(digest)
        return Sample(prepared, tuple(out), tuple(keys))


def gemma3_processor(model_config, name: str = "vision", processor_path: str = ""):
    """The Gemma3ImageProcessor of modality ``name``: from a Hugging Face processor directory (its
    preprocessor_config.json, pan-and-scan settings included) when ``processor_path`` names one, else the tower's
    (HF's defaults: pan-and-scan off). A square other than the tower's image_size is a ValueError naming both."""
    from mllm_jax.data.processor.gemma3 import Gemma3ImageProcessor

    enc = model_config.encoders[name]
    if not processor_path:
        return Gemma3ImageProcessor.for_model(enc)
    proc = Gemma3ImageProcessor.from_pretrained(processor_path)
    if proc.size != enc.image_size:
        raise ValueError(f"DatasetConfig.processor_path={processor_path!r}: images of {proc.size} px, but the "
                         f"{name!r} tower takes image_size={enc.image_size}")
    return proc


class Gemma3LlavaSource(LlavaSource):
    """LLaVA JSON for a Gemma 3 model (a "gemma3" projector, docs/data.md): the sample Gemma3Processor /
    MultimodalProcessor make of the same conversation. Each ``<image>`` becomes "\\n\\n<start_of_image>" + the
    image tokens + "<end_of_image>\\n\\n", and with pan-and-scan (the processor's ``do_pan_and_scan``) the crop text
    and one such sequence per crop, tokenised with the text around it (text.Gemma3ConversationEncoder); each image and
    each crop is one encoder instance (``Instance.view``), resized and normalised by Gemma3ImageProcessor.

    ``prepare`` reads only each image's header: its crop count is ``pan_and_scan_grid`` of its size, so every host
    plans the same lengths without decoding; ``materialize`` decodes the pixels and checks the crop count
    (``grid_mismatch`` if a file changed in between)."""

    def __init__(self, json_path: str, image_folder: str, tokenizer, model_config, *, max_tokens: int,
                 max_instances: int, template: ChatTemplate | str = "gemma",
                 max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, processor_path: str = ""):
        from mllm_jax.data.processor.gemma3 import Gemma3Prompt

        super().__init__(json_path, image_folder, tokenizer, model_config, max_tokens=max_tokens,
                         max_instances=max_instances, template=template, max_image_pixels=max_image_pixels)
        self.processor = gemma3_processor(model_config, self.modality, processor_path)
        prompt = Gemma3Prompt.for_model(model_config, tokenizer, self.modality)
        self.encoder = Gemma3ConversationEncoder(tokenizer, prompt, model_config.placeholder_ids[self.modality],
                                                 template)

    def prepare(self, index: int) -> PreparedSample:
        sid, turns, media = self._record(index)
        if self.encoder.count_images(turns) != len(media):
            raise BadSampleError(sid, "placeholder_mismatch", f"{self.encoder.count_images(turns)} "
                                 f"{self.encoder.marker} placeholders in the text but {len(media)} files")
        for p in media:
            if not os.path.isfile(p):
                raise BadSampleError(sid, "missing_file", f"{p} does not exist")
        crops = [len(self.processor.crops(*media_lib.image_size(p, sid, max_pixels=self.max_image_pixels)))
                 for p in media]
        views = [(p, k) for p, n in zip(media, crops) for k in range(1 + n)]
        if len(views) > self.max_instances:
            raise BadSampleError(sid, "too_many_instances",
                                 f"{len(media)} images with {crops} crops are {len(views)} {self.modality!r} "
                                 f"instances, more than the largest bucket's {self.max_instances} per microbatch")
        try:
            ids, target, starts = self.encoder.encode_turns(turns, crops)
        except ValueError as e:
            raise BadSampleError(sid, "malformed_record", str(e)) from None
        if len(ids) > self.max_tokens:
            raise BadSampleError(sid, "too_long", f"{len(ids)} tokens, more than the longest bucket's {self.max_tokens}")
        t = self.feature_counts[self.modality]
        instances = tuple(Instance(self.modality, start, t, p, view=k) for start, (p, k) in zip(starts, views))
        return PreparedSample(sid, ids, target, instances)

    def preprocessing(self) -> dict:
        return {"version": media_lib.PREPROCESSING_VERSION, "processor": repr(self.processor)}

    def materialize(self, prepared: PreparedSample) -> Sample:
        """Each image decoded once and through the processor: its rows [image, crops...] are its instances' inputs.
        A crop's cache key is its file's digest + "-crop<k>" (the image's is the digest)."""
        sid, out, keys = prepared.sample_id, [], []
        instances = prepared.instances
        for j, inst in enumerate(instances):
            if inst.view == 0:
                data, digest = read_media(inst.media, sid)
                rows = self.processor(media_lib.decode_rgb(inst.media, sid, max_pixels=self.max_image_pixels,
                                                           data=data))
                planned = 1 + next((k for k, i in enumerate(instances[j + 1:]) if i.view == 0),
                                   len(instances) - j - 1)
                if len(rows) != planned:
                    raise BadSampleError(sid, "grid_mismatch", f"{inst.media}: decoded to {len(rows) - 1} crops, but "
                                         f"its header planned {planned - 1} (the file changed since)")
            out.append(rows[inst.view])
            keys.append(digest if inst.view == 0 else f"{digest}-crop{inst.view}")
        return Sample(prepared, tuple(out), tuple(keys))


def make_source(config, tokenizer, model_config, *, template: ChatTemplate | str | None = None):
    """The source a DatasetConfig names; lengths and instance limits from its largest buckets. LLaVA JSON for a
    native-resolution "vision" tower is read by NativeLlavaSource (instance_buckets then count patch rows), for a
    Gemma 3 model (a "gemma3" vision projector) by Gemma3LlavaSource. ``template``: the chat template; by default
    "gemma" for a Gemma 3 model (its checkpoints' turns), else "synthetic"."""
    config.validate()
    projector = model_config.projectors.get("vision")
    gemma3 = config.format == "llava" and projector is not None and projector.kind == "gemma3"
    if template is None:
        template = "gemma" if gemma3 else "synthetic"
    kw = dict(max_tokens=max(config.seq_len_buckets), max_instances=max(config.instance_buckets), template=template)
    if config.format == "llava" and "vision" in model_config.encoders and model_config.is_native_resolution("vision"):
        kw["max_rows"] = kw.pop("max_instances")
        return NativeLlavaSource(config.path, config.media_root, tokenizer, model_config,
                                 max_image_pixels=config.max_image_pixels, video_fps=config.video_fps,
                                 processor_path=config.processor_path, **kw)
    if gemma3:
        return Gemma3LlavaSource(config.path, config.media_root, tokenizer, model_config,
                                 max_image_pixels=config.max_image_pixels, processor_path=config.processor_path, **kw)
    if config.format == "llava":
        return LlavaSource(config.path, config.media_root, tokenizer, model_config, mean=config.image_mean,
                           std=config.image_std, max_image_pixels=config.max_image_pixels, **kw)
    return AudioCaptionSource(config.path, config.media_root, tokenizer, model_config, prompt=config.audio_prompt, **kw)
