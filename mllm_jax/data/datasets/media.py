"""Decoding media files into encoder inputs: images -> float32 [H, W, C]; audio -> Whisper log-mel [T, n_mels].

Every failure is a ``BadSampleError`` naming the sample, with reason "missing_file", "corrupt_file",
"image_too_large" (width x height from the header above ``max_pixels``, or PIL's decompression-bomb error; checked
before any pixel is decoded) or "bad_audio_shape", so the loader's on_bad_sample policy decides what happens to it.
"""

from __future__ import annotations

import functools
import hashlib
import io
import os
import wave

import numpy as np
from PIL import Image

from mllm_jax.data.datasets.sample import BadSampleError

WHISPER_RATE = 16000
WHISPER_N_FFT = 400
WHISPER_HOP = 160


DEFAULT_MAX_IMAGE_PIXELS = 50_000_000
# Bump when load_image / load_audio turn the same file into other encoder inputs: a frozen encoder's feature cache
# (mllm_jax.data.encoder_cache) puts it in its fingerprint, so entries made by the old decoding are not read.
PREPROCESSING_VERSION = "media-v1"


def read_media(path: str, sample_id: str) -> tuple[bytes, str]:
    """(the file's bytes, their sha256 hex): the bytes are decoded (``data=`` of load_image / load_audio) and the
    digest is the instance's feature-cache key, read once so that both describe the same content."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise BadSampleError(sample_id, "missing_file", f"{path} does not exist") from None
    except OSError as e:
        raise BadSampleError(sample_id, "corrupt_file", f"{path} cannot be read: {e}") from None
    return data, hashlib.sha256(data).hexdigest()


def load_image(path: str, sample_id: str, *, size: int, mean, std, channels: int = 3,
               max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, data: bytes | None = None) -> np.ndarray:
    """RGB, resized to size x size (bicubic, like the CLIP processor after its crop), scaled to [0, 1], normalised.
    An image whose header claims more than ``max_pixels`` pixels is refused before it is decoded. ``data``: the
    file's bytes, already read (``read_media``); ``path`` then only names it in errors."""
    if data is None and not os.path.isfile(path):
        raise BadSampleError(sample_id, "missing_file", f"image {path} does not exist")
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as img:  # reads the header only
            width, height = img.size
            if width * height > max_pixels:
                raise BadSampleError(sample_id, "image_too_large",
                                     f"image {path} is {width} x {height} = {width * height:,} pixels, more than "
                                     f"DatasetConfig.max_image_pixels={max_pixels:,}")
            img.load()  # decode now: a truncated file fails here, not later
            img = img.convert("RGB" if channels == 3 else "L").resize((size, size), Image.BICUBIC)
            x = np.asarray(img, np.float32) / 255.0
    except BadSampleError:
        raise
    except Image.DecompressionBombError as e:  # PIL's own limit (raised by open, before our check can run)
        raise BadSampleError(sample_id, "image_too_large", f"image {path}: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:  # PIL raises these for unreadable/corrupt files
        raise BadSampleError(sample_id, "corrupt_file", f"image {path} cannot be decoded: {e}") from None
    x = x.reshape(size, size, channels)
    return ((x - np.asarray(mean, np.float32)[:channels]) / np.asarray(std, np.float32)[:channels]).astype(np.float32)


def read_wav(path: str, sample_id: str, data: bytes | None = None) -> tuple[np.ndarray, int]:
    """Mono float32 waveform in [-1, 1] and its sample rate, from 8/16/32-bit PCM WAV (``data``: its bytes)."""
    try:
        with wave.open(path if data is None else io.BytesIO(data), "rb") as w:
            rate, width, channels, n = w.getframerate(), w.getsampwidth(), w.getnchannels(), w.getnframes()
            raw = w.readframes(n)
    except (OSError, EOFError, wave.Error) as e:
        raise BadSampleError(sample_id, "corrupt_file", f"audio {path} cannot be read as WAV: {e}") from None
    dtypes = {1: np.uint8, 2: np.int16, 4: np.int32}
    if width not in dtypes:
        raise BadSampleError(sample_id, "corrupt_file", f"audio {path} has unsupported sample width {width} bytes")
    x = np.frombuffer(raw, dtypes[width]).astype(np.float32)
    x = (x - 128.0) / 128.0 if width == 1 else x / float(2 ** (8 * width - 1))
    if channels > 1:
        x = x.reshape(-1, channels).mean(axis=1)
    return x, rate


def resample(x: np.ndarray, rate: int, target: int = WHISPER_RATE) -> np.ndarray:
    """Linear-interpolation resampling (enough for captions; use a proper resampler offline for quality)."""
    if rate == target:
        return x
    n = int(round(len(x) * target / rate))
    return np.interp(np.arange(n) * (rate / target), np.arange(len(x)), x).astype(np.float32)


def _hz_to_mel(f):
    """Slaney mel scale (librosa's default and Whisper's): linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, np.float64)
    mel = f / (200.0 / 3)
    log_part = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(f >= 1000.0, log_part, mel)


def _mel_to_hz(m):
    m = np.asarray(m, np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), m * (200.0 / 3))


@functools.lru_cache(maxsize=8)
def mel_filters(n_mels: int, n_fft: int = WHISPER_N_FFT, rate: int = WHISPER_RATE) -> np.ndarray:
    """Slaney-normalised triangular filters [n_fft // 2 + 1, n_mels] from 0 Hz to rate / 2."""
    freqs = np.linspace(0, rate / 2, n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(rate / 2), n_mels + 2))
    lower = (freqs[:, None] - edges[None, :-2]) / (edges[1:-1] - edges[:-2])
    upper = (edges[None, 2:] - freqs[:, None]) / (edges[2:] - edges[1:-1])
    fb = np.maximum(0.0, np.minimum(lower, upper))
    return fb * (2.0 / (edges[2:] - edges[:-2]))[None, :]


def log_mel(wave_: np.ndarray, *, n_mels: int, num_frames: int, n_fft: int = WHISPER_N_FFT,
            hop: int = WHISPER_HOP) -> np.ndarray:
    """Whisper's features: pad/trim to num_frames * hop samples, centred STFT (periodic Hann, reflect padding),
    power -> mel -> log10, floor at max - 8, then (x + 4) / 4. Returns float32 [num_frames, n_mels]."""
    n = num_frames * hop
    x = np.zeros(n, np.float64)
    x[: min(n, len(wave_))] = wave_[:n]
    padded = np.pad(x, n_fft // 2, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    starts = np.arange(num_frames) * hop  # Whisper drops the STFT's last frame: exactly num_frames remain
    frames = padded[starts[:, None] + np.arange(n_fft)[None, :]] * window
    power = np.abs(np.fft.rfft(frames, axis=-1)) ** 2
    mel = np.log10(np.maximum(power @ mel_filters(n_mels, n_fft), 1e-10))
    mel = np.maximum(mel, mel.max() - 8.0)
    return ((mel + 4.0) / 4.0).astype(np.float32)


def load_audio(path: str, sample_id: str, *, n_mels: int, num_frames: int, data: bytes | None = None) -> np.ndarray:
    """.wav or .npy (1-D: a 16 kHz waveform; 2-D: precomputed log-mel [T, n_mels]) -> float32 [num_frames, n_mels].

    Precomputed features longer than num_frames are trimmed; shorter ones are padded with their own minimum (the
    silence floor of a log-mel). ``data``: the file's bytes, already read (``read_media``)."""
    if data is None and not os.path.isfile(path):
        raise BadSampleError(sample_id, "missing_file", f"audio {path} does not exist")
    if path.endswith(".npy"):
        try:
            a = np.load(path if data is None else io.BytesIO(data), allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise BadSampleError(sample_id, "corrupt_file", f"audio {path} cannot be read as .npy: {e}") from None
        if a.ndim == 1:
            return log_mel(a.astype(np.float64), n_mels=n_mels, num_frames=num_frames)
        if a.ndim != 2 or a.shape[1] != n_mels or not np.all(np.isfinite(a)):
            raise BadSampleError(sample_id, "bad_audio_shape",
                                 f"audio {path}: want a waveform [T] or finite log-mel [T, {n_mels}]; got {a.shape}")
        out = np.full((num_frames, n_mels), a.min() if a.size else 0.0, np.float32)
        out[: min(num_frames, a.shape[0])] = a[:num_frames]
        return out
    if path.endswith(".wav"):
        x, rate = read_wav(path, sample_id, data)
        return log_mel(resample(x, rate), n_mels=n_mels, num_frames=num_frames)
    raise BadSampleError(sample_id, "corrupt_file", f"audio {path}: unsupported extension (want .wav or .npy)")


# ----------------------------------------------------------------- native resolution (Qwen2-VL processor, videos)

FRAME_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def _open_image(path: str, sample_id: str, max_pixels: int, data: bytes | None = None):
    """An opened (not yet decoded) PIL image; its header checked against ``max_pixels``."""
    if data is None and not os.path.isfile(path):
        raise BadSampleError(sample_id, "missing_file", f"image {path} does not exist")
    try:
        img = Image.open(path if data is None else io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadSampleError(sample_id, "image_too_large", f"image {path}: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise BadSampleError(sample_id, "corrupt_file", f"image {path} cannot be decoded: {e}") from None
    width, height = img.size
    if width * height > max_pixels:
        img.close()
        raise BadSampleError(sample_id, "image_too_large",
                             f"image {path} is {width} x {height} = {width * height:,} pixels, more than "
                             f"DatasetConfig.max_image_pixels={max_pixels:,}")
    return img


def image_size(path: str, sample_id: str, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(height, width) from an image file's header (no pixel decoded)."""
    with _open_image(path, sample_id, max_pixels) as img:
        return img.size[1], img.size[0]


def decode_rgb(path: str, sample_id: str, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               data: bytes | None = None) -> np.ndarray:
    """uint8 [H, W, 3]: the image decoded and made RGB as HF's processors do (native_vision.to_rgb)."""
    from mllm_jax.data.processor.native_vision import to_rgb

    try:
        with _open_image(path, sample_id, max_pixels, data) as img:
            img.load()  # a truncated file fails here
            return to_rgb(img)
    except BadSampleError:
        raise
    except Image.DecompressionBombError as e:
        raise BadSampleError(sample_id, "image_too_large", f"image {path}: {e}") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise BadSampleError(sample_id, "corrupt_file", f"image {path} cannot be decoded: {e}") from None


def video_header(path: str, sample_id: str, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
    """(frame count, height, width, frame files) of a video without decoding it: a folder of frame images (sorted by
    file name; the first frame's header gives the size) or a .npy uint8 [T, H, W, 3] (its header). BadSampleError
    "missing_file", "corrupt_file", "bad_video" (no frames, not uint8 [T, H, W, 3]) or "image_too_large"."""
    if os.path.isdir(path):
        files = tuple(sorted(os.path.join(path, f) for f in os.listdir(path)
                             if f.lower().endswith(FRAME_EXTENSIONS) and os.path.isfile(os.path.join(path, f))))
        if not files:
            raise BadSampleError(sample_id, "bad_video", f"video folder {path} has no frames (no file ending in "
                                 f"{FRAME_EXTENSIONS})")
        h, w = image_size(files[0], sample_id, max_pixels=max_pixels)
        return len(files), h, w, files
    if not os.path.isfile(path):
        raise BadSampleError(sample_id, "missing_file", f"video {path} does not exist")
    if not path.endswith(".npy"):
        raise BadSampleError(sample_id, "bad_video", f"video {path}: want a folder of frames or a .npy file")
    try:
        a = np.load(path, mmap_mode="r", allow_pickle=False)  # the header only
    except (OSError, ValueError, EOFError) as e:
        raise BadSampleError(sample_id, "corrupt_file", f"video {path} cannot be read as .npy: {e}") from None
    if a.dtype != np.uint8 or a.ndim != 4 or a.shape[-1] != 3:
        raise BadSampleError(sample_id, "bad_video", f"video {path}: want uint8 frames [T, H, W, 3]; got "
                             f"{a.dtype} {a.shape}")
    if a.shape[0] == 0:
        raise BadSampleError(sample_id, "bad_video", f"video {path} has no frames (shape {a.shape})")
    if a.shape[1] * a.shape[2] > max_pixels:
        raise BadSampleError(sample_id, "image_too_large", f"video {path}: frames of {a.shape[1]} x {a.shape[2]} "
                             f"pixels, more than DatasetConfig.max_image_pixels={max_pixels:,}")
    return a.shape[0], a.shape[1], a.shape[2], ()


def decode_video_frames(instance, sample_id: str, *, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
    """(uint8 [n, H, W, 3] the frames ``instance.frames`` keeps, sha256 of the bytes they were decoded from): only
    the kept frames of a folder are read. Frames whose size differs from the first's: "corrupt_file"."""
    h = hashlib.sha256()
    if instance.frame_files:
        frames = []
        for k in instance.frames:
            data, digest = read_media(instance.frame_files[k], sample_id)
            h.update(digest.encode())
            frames.append(decode_rgb(instance.frame_files[k], sample_id, max_pixels=max_pixels, data=data))
        if len({f.shape for f in frames}) != 1:
            raise BadSampleError(sample_id, "corrupt_file", f"video {instance.media}: frames of different sizes "
                                 f"{sorted({f.shape[:2] for f in frames})}")
        return np.stack(frames), h.hexdigest()
    data, digest = read_media(instance.media, sample_id)
    try:
        a = np.load(io.BytesIO(data), allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise BadSampleError(sample_id, "corrupt_file", f"video {instance.media} cannot be read as .npy: {e}") from None
    return np.ascontiguousarray(a[np.asarray(instance.frames, np.int64)]), digest
