"""Speech tracks in, 16 kHz mono float32 waveforms out (what wav2vec2 was trained on).

The official pipeline reads audio with `librosa.load(path, sr=16000)`: the channels are
averaged first, then the track is resampled with soxr ("soxr_hq"). `load_audio` calls exactly
that; `to_16k_mono` does the same to a waveform already in memory (ComfyUI's AUDIO), so a
file and the same file decoded by ComfyUI give the same samples.

Empty tracks, tracks too short for one feature step (45 ms) and tracks with NaN/inf samples are
refused with an `InputError`; silence is not (the pipeline decides what silence means, see
`is_silent` and `audio_duration_s`).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import librosa
import numpy as np
import soundfile
import torch

from .errors import InputError

SAMPLE_RATE = 16000
# One feature step needs two wav2vec2 frames (a 400-sample window plus a 320-sample hop).
MIN_SAMPLES = 720
RESAMPLE_QUALITY = "soxr_hq"  # librosa.load's default, used by the official pipeline
SILENCE_PEAK = 1e-4  # about -80 dBFS
MAX_CHANNELS = 32  # more than this means time and channels were swapped
FULL_SCALE = 1.0  # float audio plays in -1..1
logger = logging.getLogger(__name__)


def load_audio(path: str | os.PathLike) -> torch.Tensor:
    """Reads a speech file as the official pipeline does.

    Args:
        path: any file libsndfile reads (wav, flac, ogg, mp3, ...) goes through `librosa.load`
            as in the official pipeline; other containers (m4a, aac, video files) are decoded
            with PyAV, then mixed down and resampled the same way.

    Returns:
        `torch.Tensor` of shape `[samples]`, float32, mono, 16 kHz.

    Raises:
        InputError: the file is missing, cannot be decoded, is empty or holds NaN/inf.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"audio file {path} does not exist. Check the path or upload the file again.")
    try:
        soundfile.info(str(path))
    except Exception as unreadable:  # libsndfile raises its own error types per format
        wave = _decode_with_pyav(path, unreadable)
    else:
        try:
            wave, _ = librosa.load(path, sr=SAMPLE_RATE, mono=True, res_type=RESAMPLE_QUALITY)
        except Exception as err:  # damaged data after a valid header, or no samples to resample
            _refuse_empty(soundfile.info(str(path)).frames, f"audio file {path}")
            raise InputError(
                f"audio file {path} could not be decoded ({type(err).__name__}: {err}). Re-export it as .wav or .flac."
            ) from None
    return _checked(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)), f"audio file {path}")


def to_16k_mono(waveform: torch.Tensor | np.ndarray, sample_rate: int, name: str = "audio") -> torch.Tensor:
    """Converts a waveform in memory to what wav2vec2 expects.

    Args:
        waveform: `[samples]`, `[channels, samples]` or `[1, channels, samples]` (ComfyUI's AUDIO
            holds `[batch, channels, samples]`), any float dtype, any number of channels.
        sample_rate: the waveform's rate in Hz.
        name: how error messages call this input (e.g. the node input's name).

    Returns:
        `torch.Tensor` of shape `[samples]`, float32, mono, 16 kHz, on the CPU.

    Raises:
        InputError: the waveform is empty, too short, batched, holds NaN/inf, or the rate is bad.
    """
    wave = waveform.detach().float().cpu().numpy() if torch.is_tensor(waveform) else np.asarray(waveform, np.float32)
    if wave.ndim == 3:
        if wave.shape[0] != 1:
            raise InputError(
                f"{name} holds a batch of {wave.shape[0]} tracks; LiveAvatar takes one speech track. "
                "Pass a single audio (split or concatenate the batch first)."
            )
        wave = wave[0]
    if wave.ndim not in (1, 2):
        raise InputError(f"{name} must be [samples], [channels, samples] or [1, channels, samples]; got {wave.shape}.")
    if not isinstance(sample_rate, (int, np.integer)) or sample_rate <= 0:
        raise InputError(f"{name} has an invalid sample rate {sample_rate!r}; give a positive whole number of Hz.")
    if wave.ndim == 2 and wave.shape[0] > MAX_CHANNELS:
        raise InputError(
            f"{name} has {wave.shape[0]} channels; expected [channels, samples] with time last. "
            "Transpose the waveform (ComfyUI's AUDIO is [batch, channels, samples])."
        )
    _refuse_empty(wave.shape[-1], name)
    if not np.isfinite(wave).all():
        raise InputError(f"{name} contains NaN or infinite samples. Re-export or re-record the audio.")
    wave = librosa.to_mono(np.ascontiguousarray(wave, dtype=np.float32))
    if sample_rate != SAMPLE_RATE:
        wave = librosa.resample(wave, orig_sr=int(sample_rate), target_sr=SAMPLE_RATE, res_type=RESAMPLE_QUALITY)
    return _checked(torch.from_numpy(np.ascontiguousarray(wave, dtype=np.float32)), name)


def audio_dict_to_16k_mono(audio: dict, name: str = "audio") -> torch.Tensor:
    """`to_16k_mono` for ComfyUI's AUDIO value `{"waveform": [B, C, T], "sample_rate": int}`."""
    if not isinstance(audio, dict) or "waveform" not in audio or "sample_rate" not in audio:
        raise InputError(
            f"{name} is not an AUDIO value (a dict with 'waveform' and 'sample_rate'). Connect an audio output."
        )
    return to_16k_mono(audio["waveform"], int(audio["sample_rate"]), name)


def limit_peak(track: torch.Tensor, name: str = "audio") -> torch.Tensor:
    """The track scaled down to a peak of full scale (1.0) when it is louder: such samples
    would be clipped into distortion by the AAC encoder and by every player. The speech
    features do not change (wav2vec2 normalises its input); a warning says what was done."""
    peak = float(track.abs().max()) if track.numel() else 0.0
    if peak <= FULL_SCALE:
        return track
    logger.warning(
        "%s peaks at %.1f dBFS, above full scale: the video's sound is scaled down by %.1f dB "
        "to avoid distortion. Lower the volume before LiveAvatar to control this yourself.",
        name,
        20 * math.log10(peak),
        20 * math.log10(peak),
    )
    return track / peak


def audio_duration_s(waveform: torch.Tensor | np.ndarray, sample_rate: int = SAMPLE_RATE) -> float:
    """Length in seconds of a waveform whose last axis is time."""
    return waveform.shape[-1] / float(sample_rate)


def is_silent(waveform: torch.Tensor | np.ndarray, peak: float = SILENCE_PEAK) -> bool:
    """True when no sample reaches `peak` (digital silence or near it)."""
    wave = torch.as_tensor(waveform)
    return wave.numel() == 0 or bool(wave.abs().max() < peak)


def _refuse_empty(samples: int, name: str) -> None:
    if samples == 0:
        raise InputError(f"{name} is empty (0 samples). Give a speech track of at least 0.1 s.")


def _checked(wave: torch.Tensor, name: str) -> torch.Tensor:
    _refuse_empty(wave.shape[-1], name)
    if wave.shape[-1] < MIN_SAMPLES:
        raise InputError(
            f"{name} is too short ({1000 * audio_duration_s(wave):.1f} ms at 16 kHz): the audio encoder needs "
            f"at least {1000 * MIN_SAMPLES // SAMPLE_RATE} ms. Give a speech track of at least 0.1 s."
        )
    if not torch.isfinite(wave).all():
        raise InputError(f"{name} contains NaN or infinite samples. Re-export or re-record the audio.")
    return wave


def _decode_with_pyav(path: Path, soundfile_error: Exception) -> np.ndarray:
    """Decodes containers libsndfile cannot read (m4a, aac, video files) to 16 kHz mono."""
    import av  # imported here: only needed for the formats librosa cannot open

    try:
        with av.open(str(path)) as container:
            if not container.streams.audio:
                raise InputError(f"audio file {path} holds no audio stream. Give a file with a speech track.")
            stream = container.streams.audio[0]
            # Planar float keeps the native rate and channels: [channels, samples] per frame.
            to_float = av.AudioResampler(format="fltp")
            chunks = [f.to_ndarray() for frame in container.decode(stream) for f in to_float.resample(frame)]
            chunks += [f.to_ndarray() for f in to_float.resample(None)]
            rate = stream.rate
    except InputError:
        raise
    except Exception as err:  # PyAV raises its own error family per codec/container problem
        raise InputError(
            f"audio file {path} could not be decoded ({type(soundfile_error).__name__}: {soundfile_error}; "
            f"{type(err).__name__}: {err}). Convert it to .wav or .flac."
        ) from None
    if not chunks:
        _refuse_empty(0, f"audio file {path}")
    return to_16k_mono(np.concatenate(chunks, axis=-1), rate, f"audio file {path}").numpy()
