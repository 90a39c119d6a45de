"""Learnable synthetic multimodal samples made on the fly with numpy: no downloads, deterministic per (seed, index).

Tasks whose answers can only be produced by looking at the input:
- image: a coloured shape in one of 3x3 cells, captioned "a red circle at the top left"; for a native-resolution
  tower (NativeVisionConfig) the image has its own size and aspect (``native_image``: uint8 pixels for the processor);
- video (native-resolution towers only): a short clip of a shape moving a few pixels a frame, captioned by the way it
  moves, "a red circle moving leftward" (leftward, rightward, upward, downward: ``native_video``), asked with a
  prompt of its own, "<image> describe the video .";
- audio: a pure tone, captioned "a 440 hz tone", given to the model as Whisper-style log-mel frames;
- text: "count from four :" answered "five six seven".
Positions, sizes, brightness, noise and phase are jittered so held-out samples are new inputs.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mllm_jax.data.tokenizer import COLOURS, COLS, NUMBER_WORDS, ROWS, SHAPES, TONES_HZ

TASKS = ("image", "video", "audio", "text")
TASK_MODALITY = {"image": "vision", "video": "vision", "audio": "audio", "text": None}
# A video's motion (the caption word) -> its direction (dy, dx) in pixels (y down).
VIDEO_MOTIONS = {"leftward": (0.0, -1.0), "rightward": (0.0, 1.0), "upward": (-1.0, 0.0), "downward": (1.0, 0.0)}
_RGB = {
    "red": (1.0, 0.1, 0.1), "green": (0.1, 0.9, 0.1), "blue": (0.15, 0.2, 1.0),
    "yellow": (1.0, 0.95, 0.1), "magenta": (1.0, 0.1, 1.0), "cyan": (0.1, 0.95, 1.0),
}
_SPLIT_IDS = {"train": 0, "eval": 1}


@dataclasses.dataclass
class Sample:
    """One conversation: the prompt holds one placeholder token per media item, in order."""

    task: str
    prompt: str
    answer: str
    media: list  # [(modality name, float32 array)]


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    if split not in _SPLIT_IDS:
        raise ValueError(f"split must be one of {tuple(_SPLIT_IDS)}; got {split!r}")
    return np.random.default_rng([seed, _SPLIT_IDS[split], index])


def render_shape(rng: np.random.Generator, image_size: int, colour: str, shape: str, row: int, col: int):
    """NHWC-ready float32 [H, W, 3] in [-1, 1]: dim noisy background, one filled shape centred in cell (row, col)."""
    cell = image_size / 3.0
    cy = (row + 0.5) * cell + rng.uniform(-cell / 8, cell / 8)
    cx = (col + 0.5) * cell + rng.uniform(-cell / 8, cell / 8)
    r = cell * rng.uniform(0.3, 0.42)
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32) + 0.5
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        inside = dx * dx + dy * dy <= r * r
    elif shape == "square":
        inside = (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    elif shape == "triangle":  # apex up: width grows linearly from the top edge to the base
        inside = (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    else:
        raise ValueError(f"shape must be one of {SHAPES}; got {shape!r}")
    background = rng.uniform(0.0, 0.25) + rng.normal(0.0, 0.04, (image_size, image_size, 3))
    rgb = np.asarray(_RGB[colour], np.float32) * rng.uniform(0.8, 1.0)
    img = np.where(inside[..., None], rgb, background)
    return (np.clip(img, 0.0, 1.0) * 2.0 - 1.0).astype(np.float32)


def mel_filterbank(n_mels: int, n_fft: int, sample_rate: int, fmax: float) -> np.ndarray:
    """Triangular HTK-mel filters [n_fft // 2 + 1, n_mels]."""
    def hz_to_mel(f):
        return 2595.0 * np.log10(1.0 + np.asarray(f) / 700.0)

    def mel_to_hz(m):
        return 700.0 * (10.0 ** (np.asarray(m) / 2595.0) - 1.0)

    edges_hz = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(fmax), n_mels + 2))
    bins_hz = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)
    lo, mid, hi = edges_hz[:-2], edges_hz[1:-1], edges_hz[2:]
    up = (bins_hz[:, None] - lo) / (mid - lo)
    down = (hi - bins_hz[:, None]) / (hi - mid)
    return np.maximum(0.0, np.minimum(up, down)).astype(np.float32)


def log_mel(wave: np.ndarray, n_mels: int, n_frames: int, *, sample_rate=16000, n_fft=400, hop=160, fmax=4000.0):
    """Whisper-style log-mel [n_frames, n_mels]: Hann STFT power, mel filters, log10, clamp to max - 8, (x + 4) / 4."""
    need = (n_frames - 1) * hop + n_fft
    wave = np.pad(wave, (0, max(0, need - len(wave))))
    idx = np.arange(n_frames)[:, None] * hop + np.arange(n_fft)[None, :]
    frames = wave[idx] * np.hanning(n_fft + 1)[:-1].astype(np.float32)
    power = np.abs(np.fft.rfft(frames, axis=-1)) ** 2
    mel = power @ mel_filterbank(n_mels, n_fft, sample_rate, fmax)
    logm = np.log10(np.maximum(mel, 1e-10))
    logm = np.maximum(logm, logm.max() - 8.0)
    return ((logm + 4.0) / 4.0).astype(np.float32)


def tone_clip(rng: np.random.Generator, hz: float, n_frames: int, n_mels: int, *, sample_rate=16000, hop=160,
              fmax=4000.0):
    n = n_frames * hop + 400
    t = np.arange(n, dtype=np.float64) / sample_rate
    wave = rng.uniform(0.3, 1.0) * np.sin(2 * np.pi * hz * t + rng.uniform(0, 2 * np.pi))
    wave = wave + rng.normal(0.0, 0.02, n)
    return log_mel(wave.astype(np.float32), n_mels, n_frames, sample_rate=sample_rate, hop=hop, fmax=fmax)


def make_sample(rng: np.random.Generator, task: str, *, image_size: int = 32, n_frames: int = 32, n_mels: int = 16,
                audio_fmax: float = 4000.0) -> Sample:
    if task == "image":
        colour = COLOURS[rng.integers(len(COLOURS))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        row, col = int(rng.integers(3)), int(rng.integers(3))
        img = render_shape(rng, image_size, colour, shape, row, col)
        return Sample(task, "<image> describe the image .", f"a {colour} {shape} at the {ROWS[row]} {COLS[col]}",
                      [("vision", img)])
    if task == "audio":
        hz = TONES_HZ[rng.integers(len(TONES_HZ))]
        mel = tone_clip(rng, hz, n_frames, n_mels, fmax=audio_fmax)
        return Sample(task, "<audio> what do you hear ?", f"a {hz} hz tone", [("audio", mel)])
    if task == "text":
        start = int(rng.integers(0, len(NUMBER_WORDS) - 3))
        answer = " ".join(NUMBER_WORDS[start + 1:start + 4])
        return Sample(task, f"count from {NUMBER_WORDS[start]} :", answer, [])
    raise ValueError(f"task must be one of {TASKS}; got {task!r}")


# ---------------------------------------------------------------------------------------- native resolution (uint8)


def _shape_mask(height: int, width: int, shape: str, cy: float, cx: float, r: float) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    dy, dx = yy - cy, xx - cx
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return (np.abs(dx) <= r * 0.85) & (np.abs(dy) <= r * 0.85)
    if shape == "triangle":  # apex up
        return (dy >= -r) & (dy <= r) & (np.abs(dx) <= (dy + r) / 2)
    raise ValueError(f"shape must be one of {SHAPES}; got {shape!r}")


def _frame_uint8(rng, height: int, width: int, colour: str, masks) -> np.ndarray:
    """uint8 [T, H, W, 3]: a dim noisy background per frame, the shape's pixels (masks [T, H, W]) in ``colour``."""
    t = len(masks)
    background = rng.uniform(0.0, 0.25) + rng.normal(0.0, 0.04, (t, height, width, 3))
    rgb = np.asarray(_RGB[colour], np.float32) * rng.uniform(0.8, 1.0)
    img = np.where(np.asarray(masks)[..., None], rgb, background)
    return np.round(np.clip(img, 0.0, 1.0) * 255).astype(np.uint8)


# Native-resolution rendering (issue 21's CPU recipe, configs/qwen2vl_tiny.gin): every image has a 1-px grey frame
# (a border the tower can see: it has only relative positions), shapes of radius 0.40..0.48 of a cell; a video's shape
# (0.45..0.55 of a third of the frame) moves NATIVE_VIDEO_STEP px a frame: one 4-px patch, so a temporal patch of 2
# frames shows the shape shifted by a patch and consecutive temporal patches by a merged unit (with 2 px a frame the
# direction was linearly readable from a clip's mean merged raw patches at 0.33 held-out, chance 0.25; at 4 px 0.80).
# Small media (3..4 blocks a side, 4-frame clips: 9..18 LLM tokens) so 8 samples fit a 256-token row.
NATIVE_FRAME_GREY = 0.6
NATIVE_SHAPE_SCALE = (0.4, 0.48)
NATIVE_VIDEO_SHAPE_SCALE = (0.45, 0.55)
NATIVE_VIDEO_STEP = 4.0
NATIVE_IMAGE_BLOCKS = (3, 4)  # images of 3..4 x 3..4 blocks of patch x merge pixels
NATIVE_VIDEO_BLOCKS = (3, 3)
NATIVE_VIDEO_FRAMES = (4,)


def native_image(rng, height: int, width: int, colour: str, shape: str, row: int, col: int) -> np.ndarray:
    """uint8 [H, W, 3]: one filled shape centred in cell (row, col) of a 3x3 grid over an H x W image, in a 1-px grey
    frame."""
    ch, cw = height / 3.0, width / 3.0
    cy = (row + 0.5) * ch + rng.uniform(-ch / 8, ch / 8)
    cx = (col + 0.5) * cw + rng.uniform(-cw / 8, cw / 8)
    r = min(ch, cw) * rng.uniform(*NATIVE_SHAPE_SCALE)
    img = _frame_uint8(rng, height, width, colour, [_shape_mask(height, width, shape, cy, cx, r)])[0]
    img[0, :] = img[-1, :] = img[:, 0] = img[:, -1] = round(NATIVE_FRAME_GREY * 255)
    return img


def native_video(rng, frames: int, height: int, width: int, colour: str, shape: str, motion: str) -> np.ndarray:
    """uint8 [T, H, W, 3]: a shape moving ``motion`` (VIDEO_MOTIONS) by a few pixels a frame, inside the frame."""
    dy, dx = VIDEO_MOTIONS[motion]
    step = NATIVE_VIDEO_STEP
    r = min(height, width) / 3.0 * rng.uniform(*NATIVE_VIDEO_SHAPE_SCALE)
    travel = (frames - 1) * step
    size = height if dy else width
    lo, hi = r + 0.5, size - r - 0.5 - travel
    if hi < lo:
        raise ValueError(f"a {frames}-frame clip of {height}x{width} px is too small for a shape of radius {r:.1f} "
                         f"moving {step} px a frame")
    a0 = rng.uniform(lo, hi)
    across = rng.uniform(0.3, 0.7) * (width if dy else height)
    masks = []
    for i in range(frames):
        a = a0 + i * step
        a = a if (dy + dx) > 0 else size - a
        cy, cx = (a, across) if dy else (across, a)
        masks.append(_shape_mask(height, width, shape, cy, cx, r))
    return _frame_uint8(rng, height, width, colour, masks)


def make_native_sample(rng: np.random.Generator, task: str, *, factor: int,
                       video_frames: tuple = NATIVE_VIDEO_FRAMES) -> Sample:
    """A sample for a native-resolution vision tower: images of NATIVE_IMAGE_BLOCKS blocks of ``factor`` pixels a side
    (patch size x merge size: so the processor keeps the size), videos of ``video_frames`` frames at
    NATIVE_VIDEO_BLOCKS blocks a side."""
    if task == "image":
        colour = COLOURS[rng.integers(len(COLOURS))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        row, col = int(rng.integers(3)), int(rng.integers(3))
        h, w = (int(v) * factor for v in rng.integers(NATIVE_IMAGE_BLOCKS[0], NATIVE_IMAGE_BLOCKS[1] + 1, size=2))
        img = native_image(rng, h, w, colour, shape, row, col)
        return Sample(task, "<image> describe the image .", f"a {colour} {shape} at the {ROWS[row]} {COLS[col]}",
                      [("vision", img)])
    if task == "video":
        colour = COLOURS[rng.integers(len(COLOURS))]
        shape = SHAPES[rng.integers(len(SHAPES))]
        motion = tuple(VIDEO_MOTIONS)[rng.integers(len(VIDEO_MOTIONS))]
        t = int(video_frames[rng.integers(len(video_frames))])
        h, w = (int(v) * factor for v in rng.integers(NATIVE_VIDEO_BLOCKS[0], NATIVE_VIDEO_BLOCKS[1] + 1, size=2))
        clip = native_video(rng, t, h, w, colour, shape, motion)
        return Sample(task, "<image> describe the video .", f"a {colour} {shape} moving {motion}", [("vision", clip)])
    raise ValueError(f"native-resolution tasks are 'image' and 'video'; got {task!r}")
