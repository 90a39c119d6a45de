"""Waveforms -> Whisper log-mel features with numpy (the math of WhisperFeatureExtractor).

16 kHz mono audio is zero-padded or trimmed to 30 s, framed with a 400-sample periodic Hann window every 160 samples
(centred, reflect padding), turned into a power spectrum, projected on an 80-band (or 128) Slaney mel filterbank,
log10'd (floor 1e-10), the last frame dropped, clamped to (max - 8) and mapped by (x + 4) / 4.
Output is [frames, n_mels] (time-major, the layout the audio encoder takes), i.e. HF's [n_mels, frames] transposed.
"""

from __future__ import annotations

import dataclasses

import numpy as np


def hz_to_mel_slaney(hz):
    hz = np.asarray(hz, np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    mel = hz / f_sp
    return np.where(hz >= min_log_hz, min_log_mel + np.log(np.maximum(hz, 1e-10) / min_log_hz) / logstep, mel)


def mel_to_hz_slaney(mel):
    mel = np.asarray(mel, np.float64)
    f_sp, min_log_hz = 200.0 / 3, 1000.0
    min_log_mel, logstep = min_log_hz / f_sp, np.log(6.4) / 27.0
    return np.where(mel >= min_log_mel, min_log_hz * np.exp(logstep * (mel - min_log_mel)), f_sp * mel)


def mel_filter_bank(n_freqs: int, n_mels: int, sampling_rate: int, f_min: float = 0.0, f_max: float | None = None):
    """Triangular filters, equally spaced on the Slaney mel scale, area-normalised (norm="slaney"): [n_freqs, n_mels]."""
    f_max = sampling_rate / 2 if f_max is None else f_max
    mel_points = np.linspace(hz_to_mel_slaney(f_min), hz_to_mel_slaney(f_max), n_mels + 2)
    edges_hz = mel_to_hz_slaney(mel_points)
    fft_hz = np.linspace(0, sampling_rate / 2, n_freqs)
    widths = np.diff(edges_hz)
    offsets = edges_hz[None, :] - fft_hz[:, None]  # [n_freqs, n_mels + 2]
    rising = -offsets[:, :-2] / widths[:-1]
    falling = offsets[:, 2:] / widths[1:]
    filters = np.maximum(0.0, np.minimum(rising, falling))
    return filters * (2.0 / (edges_hz[2:] - edges_hz[:-2]))[None, :]


@dataclasses.dataclass(frozen=True)
class WhisperFeatures:
    n_mels: int = 80
    sampling_rate: int = 16000
    n_fft: int = 400
    hop_length: int = 160
    chunk_seconds: int = 30

    @classmethod
    def for_model(cls, audio_config) -> "WhisperFeatures":
        """Matches an AudioConfig: n_mels, and a chunk whose frame count is the encoder's num_frames."""
        features = cls(n_mels=audio_config.n_mels)
        frames = audio_config.num_frames
        if frames * features.hop_length % features.sampling_rate:
            raise ValueError(
                f"AudioConfig.num_frames={frames} is not a whole number of seconds at hop {features.hop_length}"
                f" and {features.sampling_rate} Hz"
            )
        return dataclasses.replace(features, chunk_seconds=frames * features.hop_length // features.sampling_rate)

    @property
    def n_samples(self) -> int:
        return self.chunk_seconds * self.sampling_rate

    @property
    def n_frames(self) -> int:
        return self.n_samples // self.hop_length

    @property
    def shape(self) -> tuple[int, int]:
        return (self.n_frames, self.n_mels)

    def __call__(self, waveform) -> np.ndarray:
        """1-D float waveform at ``sampling_rate`` -> float32 [n_frames, n_mels]."""
        audio = np.asarray(waveform, np.float64)
        if audio.ndim != 1:
            raise ValueError(f"waveform must be 1-D (mono samples); got shape {audio.shape}")
        audio = np.pad(audio[: self.n_samples], (0, max(0, self.n_samples - audio.shape[0])))
        power = stft_power(audio, self.n_fft, self.hop_length)  # [frames + 1, n_fft // 2 + 1]
        filters = mel_filter_bank(self.n_fft // 2 + 1, self.n_mels, self.sampling_rate, 0.0, 8000.0)
        log_mel = np.log10(np.maximum(power @ filters, 1e-10))[:-1]
        log_mel = np.maximum(log_mel, log_mel.max() - 8.0)
        return ((log_mel + 4.0) / 4.0).astype(np.float32)

    def batch(self, waveforms) -> np.ndarray:
        if not len(waveforms):
            return np.zeros((0, *self.shape), np.float32)
        return np.stack([self(w) for w in waveforms])


def stft_power(audio: np.ndarray, n_fft: int, hop: int) -> np.ndarray:
    """|STFT|^2 with a periodic Hann window, centred frames (reflect padding): [frames, n_fft // 2 + 1]."""
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)  # periodic Hann
    padded = np.pad(audio, n_fft // 2, mode="reflect")
    n_frames = 1 + (padded.shape[0] - n_fft) // hop
    frames = np.lib.stride_tricks.as_strided(
        padded, shape=(n_frames, n_fft), strides=(padded.strides[0] * hop, padded.strides[0]), writeable=False
    )
    spectrum = np.fft.rfft(frames * window, axis=-1)
    return spectrum.real**2 + spectrum.imag**2
