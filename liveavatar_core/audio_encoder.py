"""The wav2vec2 audio encoder of Wan2.2-S2V / LiveAvatar and the DiT's audio features.

The network is transformers' `Wav2Vec2Model` (wav2vec2-large-xlsr-53-english: 1024 features,
24 layers, 16 heads, layer-norm conv stack, "stable" pre-norm transformer). The official
release ships it as a transformers folder of `Wav2Vec2ForCTC`; ComfyUI repackages the same
tensors as `audio_encoders/wav2vec2_large_english*.safetensors`. Only the encoder is used: the
CTC head is ignored.

How the official pipeline turns a 16 kHz waveform of `S` samples into the DiT's `audio_input`
(L = layers + 1 = 25 hidden states, C = 1024):

1. Zero-mean, unit-variance normalisation over the whole track (`Wav2Vec2FeatureExtractor`).
2. wav2vec2 with all hidden states: `[L, T50, C]`, the embedding output then each layer's
   output, the last one after the encoder's final layer norm. `T50 = (S - 400) // 320 + 1`
   (49.9 per second; the official code treats it as 50 Hz).
3. Linear interpolation in time (align_corners) to `T30 = int(T50 / 50 * 30)` steps: `[L, T30, C]`.
4. Per video frame `i` at `fps` (LiveAvatar: 25), the step `round(i * 30 / fps)` (ties to even,
   as numpy rounds the official times), plus `m` neighbours each side (LiveAvatar: m = 0):
   `[frames, L, (2m+1)*C]`; frames whose step lies past the audio get zeros.
5. The DiT takes `[1, L, (2m+1)*C, frames]` (`to_dit_layout`), cut per clip of `infer_frames`
   (48) and per block of 12 frames along the last axis.

The official code pads the features to whole clips, zeros past the audio (its
`get_audio_embed_bucket_fps`, which the tests reimplement as their reference).
`features_for_frames` produces any frame range of that same tensor (and zeros beyond it), so
a caller can keep only the frames that carry audio (`features_for_video`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2Model

from .audio_io import MIN_SAMPLES, SAMPLE_RATE
from .errors import CheckpointError, InputError
from .tensor_files import TensorFile, open_tensor_file, strip_prefix
from .time_grid import FPS  # LiveAvatar's video frame rate (Wan2.2-S2V uses 16)
from .weights import build_empty, load_weights

FEATURE_RATE = 50  # what the official code calls wav2vec2's frame rate
VIDEO_RATE = 30  # the fixed time grid the features are resampled to
WINDOW_NEIGHBOURS = 0  # `m` of the official bucketing in LiveAvatar and Wan2.2-S2V
HEAD_DIM = 64  # every released wav2vec2 (base 768/12, large 1024/16)
CONV_STRIDES = (5, 2, 2, 2, 2, 2, 2)  # not visible in the tensors; the same in every wav2vec2

WRONG_FILE_FIX = (
    "LiveAvatar needs wav2vec2-large-xlsr-53-english: the official `wav2vec2-large-xlsr-53-english` "
    "folder of Wan2.2-S2V-14B or ComfyUI's `audio_encoders/wav2vec2_large_english_fp16.safetensors`."
)
# Heads on top of the encoder that the features never use.
IGNORED_PREFIXES = ("lm_head.", "quantizer.", "project_hid.", "project_q.")
MODEL_PREFIXES = ("wav2vec2.",)
POS_CONV = "encoder.pos_conv_embed.conv."
# Old files store weight norm as weight_g/weight_v; torch's parametrization names them original0/1.
WEIGHT_NORM_NAMES = {"weight_g": "parametrizations.weight.original0", "weight_v": "parametrizations.weight.original1"}
POS_CONV_WEIGHT = POS_CONV + "parametrizations.weight.original1"  # [hidden, hidden / groups, kernel]
FEED_FORWARD = "encoder.layers.0.feed_forward.intermediate_dense.weight"
CONV_WEIGHT = re.compile(r"feature_extractor\.conv_layers\.(\d+)\.conv\.weight")
LAYER = re.compile(r"encoder\.layers\.(\d+)\.")
REQUIRED = (
    "feature_extractor.conv_layers.0.conv.weight",
    "feature_projection.projection.weight",
    "encoder.layer_norm.weight",
)


# -- checkpoint layouts -----------------------------------------------------------------------
def to_transformers_names(tensors: TensorFile) -> TensorFile:
    """A view of a wav2vec2 checkpoint under `Wav2Vec2Model`'s names.

    Accepts transformers' `Wav2Vec2ForCTC`/`Wav2Vec2Model` names (with or without `wav2vec2.`)
    and ComfyUI's layout (the same names, weight norm as a parametrization); heads are dropped.
    """

    def rename(name: str) -> str | None:
        name = strip_prefix(name, MODEL_PREFIXES)
        if name.startswith(IGNORED_PREFIXES):
            return None
        if name.startswith(POS_CONV):
            tail = name[len(POS_CONV) :]
            name = POS_CONV + WEIGHT_NORM_NAMES.get(tail, tail)
        return name

    view = tensors.renamed(rename)
    if not all(k in view for k in REQUIRED):
        raise CheckpointError(
            f"{tensors.label}: {_what_it_is(tensors)}, not a wav2vec2 audio encoder. {WRONG_FILE_FIX}"
        )
    return view


def config_from_shapes(shapes: dict[str, tuple[int, ...]], label: str) -> Wav2Vec2Config:
    """The `Wav2Vec2Config` of a checkpoint without a config.json (ComfyUI's files).

    Head count (64 per head), conv strides and the pre-norm ("stable") transformer are not
    visible in tensors: they follow the released models, where a layer-norm conv stack always
    comes with the pre-norm transformer (large) and a group-norm stack with post-norm (base).
    """
    missing = [k for k in (*REQUIRED, FEED_FORWARD, POS_CONV_WEIGHT) if k not in shapes]
    if missing:
        raise CheckpointError(f"{label}: a wav2vec2 without {missing}; the file is incomplete. {WRONG_FILE_FIX}")
    hidden = shapes["encoder.layer_norm.weight"][0]
    convs = sorted(int(m.group(1)) for k in shapes if (m := CONV_WEIGHT.fullmatch(k)))
    layers = len({m.group(1) for k in shapes if (m := LAYER.match(k))})
    if len(convs) != len(CONV_STRIDES) or hidden % HEAD_DIM or layers == 0:
        raise CheckpointError(
            f"{label}: an unknown wav2vec2 variant ({len(convs)} conv layers, hidden size {hidden}, {layers} "
            f"transformer layers). {WRONG_FILE_FIX}"
        )
    conv_shapes = [shapes[f"feature_extractor.conv_layers.{i}.conv.weight"] for i in convs]
    layer_norm_convs = "feature_extractor.conv_layers.1.layer_norm.weight" in shapes
    pos_conv = shapes[POS_CONV_WEIGHT]
    masked = "masked_spec_embed" in shapes
    return Wav2Vec2Config(
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // HEAD_DIM,
        intermediate_size=shapes[FEED_FORWARD][0],
        conv_dim=tuple(s[0] for s in conv_shapes),
        conv_kernel=tuple(s[-1] for s in conv_shapes),
        conv_stride=CONV_STRIDES,
        conv_bias="feature_extractor.conv_layers.1.conv.bias" in shapes,
        feat_extract_norm="layer" if layer_norm_convs else "group",
        do_stable_layer_norm=layer_norm_convs,
        num_conv_pos_embeddings=pos_conv[-1],
        num_conv_pos_embedding_groups=hidden // pos_conv[1],
        # masked_spec_embed exists only when masking is configured; it is unused at inference.
        mask_time_prob=0.05 if masked else 0.0,
    )


def _what_it_is(tensors: TensorFile) -> str:
    names = tensors.keys()
    if any("embed_positions" in k for k in names):
        return "this is a Whisper audio encoder"
    if not names:
        return "this file holds no tensors"
    return f"this holds other tensors (e.g. {sorted(names)[:3]})"


def _weights_and_configs(path: Path) -> tuple[TensorFile, Path | None]:
    """The tensors of a file or transformers folder, and the folder that may hold config.json."""
    if path.is_dir():
        for name in ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return open_tensor_file(path / name), path
        return open_tensor_file(path), path
    return open_tensor_file(path), path.parent


def _config_json(folder: Path | None) -> Wav2Vec2Config | None:
    """The folder's transformers config, if it describes a wav2vec2 (others are ignored)."""
    file = folder / "config.json" if folder is not None else None
    if file is None or not file.is_file():
        return None
    try:
        model_type = json.loads(file.read_text()).get("model_type")
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{file}: not valid JSON ({err}). Download config.json again.") from None
    return Wav2Vec2Config.from_json_file(str(file)) if model_type == "wav2vec2" else None


def _feature_extractor(folder: Path | None, config: Wav2Vec2Config) -> Wav2Vec2FeatureExtractor:
    """The folder's preprocessor settings; else the official ones (normalised input for the
    layer-norm "large" models, raw input for "base" ones, as ComfyUI decides too)."""
    file = folder / "preprocessor_config.json" if folder is not None else None
    if file is not None and file.is_file():
        extractor = Wav2Vec2FeatureExtractor.from_json_file(str(file))
        if extractor.sampling_rate != SAMPLE_RATE:
            raise CheckpointError(f"{file}: expects {extractor.sampling_rate} Hz audio; wav2vec2 here runs at 16 kHz.")
        return extractor
    return Wav2Vec2FeatureExtractor(
        feature_size=1,
        sampling_rate=SAMPLE_RATE,
        padding_value=0.0,
        do_normalize=config.feat_extract_norm == "layer",
        return_attention_mask=True,
    )


# -- the encoder ------------------------------------------------------------------------------
class AudioEncoder(nn.Module):
    """wav2vec2 plus its input normalisation: 16 kHz speech in, all hidden states out.

    Args:
        model (`Wav2Vec2Model`): the encoder, loaded.
        feature_extractor (`Wav2Vec2FeatureExtractor`): the official input normalisation.
        label (`str`): the file it came from, for error messages.
    """

    def __init__(self, model: Wav2Vec2Model, feature_extractor: Wav2Vec2FeatureExtractor, label: str = "audio encoder"):
        super().__init__()
        self.model = model
        self.feature_extractor = feature_extractor
        self.label = label

    @property
    def device(self) -> torch.device:
        return self.model.feature_projection.projection.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.feature_projection.projection.weight.dtype

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size

    @property
    def num_hidden_states(self) -> int:
        """Embedding output plus one per layer (25 for wav2vec2-large)."""
        return self.model.config.num_hidden_layers + 1

    def frames_50hz(self, num_samples: int) -> int:
        """How many wav2vec2 frames `num_samples` samples give (one per 320 samples)."""
        return int(self.model._get_feat_extract_output_lengths(int(num_samples)))

    def normalize(self, wave16k: torch.Tensor | np.ndarray) -> torch.Tensor:
        """The official processor's input `[1, samples]` float32 (zero mean, unit variance)."""
        wave = _as_mono_numpy(wave16k)
        values = self.feature_extractor(wave, sampling_rate=SAMPLE_RATE, return_tensors="np").input_values
        return torch.from_numpy(np.asarray(values, dtype=np.float32)).reshape(1, -1)

    def forward(self, input_values: torch.Tensor) -> torch.Tensor:
        """Normalised input `[1, samples]` -> all hidden states `[L, T50, C]` in the model's dtype.

        The last state is taken after the final layer norm, as transformers 4.x returned it
        (and Wan2.2 used it); transformers 5 returns it before that norm.
        """
        out = self.model(input_values.to(self.device, self.dtype), output_hidden_states=True)
        states = list(out.hidden_states)
        if len(states) != self.num_hidden_states:
            raise RuntimeError(f"wav2vec2 returned {len(states)} hidden states, expected {self.num_hidden_states}")
        states[-1] = out.last_hidden_state
        return torch.cat(states)

    @torch.no_grad()
    def hidden_states_50hz(self, wave16k: torch.Tensor | np.ndarray) -> torch.Tensor:
        """16 kHz mono waveform `[samples]` -> `[L, T50, C]` in the model's dtype, on its device."""
        return self(self.normalize(wave16k))

    @torch.no_grad()
    def hidden_states(self, wave16k: torch.Tensor | np.ndarray) -> torch.Tensor:
        """16 kHz mono waveform `[samples]` -> `[L, T30, C]` float32: all hidden states on the
        30-per-second grid (the official `extract_audio_feat(..., return_all_layers=True)`)."""
        samples = _as_mono_numpy(wave16k).shape[-1]
        if samples < MIN_SAMPLES:
            raise InputError(
                f"the audio is too short ({1000 * samples / SAMPLE_RATE:.0f} ms) for the audio encoder. "
                "Give a speech track of at least 0.1 s."
            )
        # The official code interpolates in the model's dtype and casts afterwards.
        return interpolate_to_video_rate(self.hidden_states_50hz(wave16k)).float()

    def features_for_video(self, wave16k: torch.Tensor | np.ndarray, fps: int = FPS) -> torch.Tensor:
        """The DiT's `audio_input` `[1, L, C, frames]` for every video frame that has audio."""
        return features_for_video(self.hidden_states(wave16k), fps)

    def check_fits(self, hidden_size: int, num_hidden_states: int) -> None:
        """Raises CheckpointError unless the features have the width and depth the DiT expects."""
        if (self.hidden_size, self.num_hidden_states) != (hidden_size, num_hidden_states):
            raise CheckpointError(
                f"{self.label}: this wav2vec2 gives {self.num_hidden_states} hidden states of {self.hidden_size} "
                f"features, but the DiT expects {num_hidden_states} of {hidden_size}. {WRONG_FILE_FIX}"
            )


def load_audio_encoder(
    path: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    expected_hidden_size: int | None = None,
    expected_hidden_states: int | None = None,
) -> AudioEncoder:
    """Loads the wav2vec2 audio encoder from local files only.

    Args:
        path: the official `wav2vec2-large-xlsr-53-english/` folder (config.json + model.safetensors
            or pytorch_model.bin of `Wav2Vec2ForCTC`; the CTC head is ignored), a file in it, or
            ComfyUI's `wav2vec2_large_english*.safetensors` (config read from tensor shapes).
        device, dtype: where the weights go and their dtype (LiveAvatar runs it in bfloat16).
        expected_hidden_size, expected_hidden_states: what the DiT needs (1024 and 25); a
            mismatch is a CheckpointError naming the file.

    Raises:
        CheckpointError: the file is missing, damaged, or holds another network.
    """
    path = Path(path)
    tensors, folder = _weights_and_configs(path)
    encoder = audio_encoder_from_tensors(tensors, device, dtype, folder)
    if expected_hidden_size is not None or expected_hidden_states is not None:
        encoder.check_fits(
            expected_hidden_size or encoder.hidden_size, expected_hidden_states or encoder.num_hidden_states
        )
    return encoder


def audio_encoder_from_tensors(
    tensors: TensorFile,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    folder: Path | None = None,
) -> AudioEncoder:
    """`load_audio_encoder` for tensors already opened or in memory (e.g. another loader's
    state dict); `folder` may hold the transformers config.json and preprocessor settings."""
    weights = to_transformers_names(tensors)
    config = _config_json(folder) or config_from_shapes(weights.shapes(), tensors.label)
    model = build_empty(lambda: Wav2Vec2Model(config))
    load_weights(model, weights, what="wav2vec2 audio encoder", device=device, dtype=dtype, fix=WRONG_FILE_FIX)
    return AudioEncoder(model.eval().requires_grad_(False), _feature_extractor(folder, config), tensors.label)


def _as_mono_numpy(wave: torch.Tensor | np.ndarray) -> np.ndarray:
    wave = wave.detach().float().cpu().numpy() if torch.is_tensor(wave) else np.asarray(wave, dtype=np.float32)
    if wave.ndim == 2 and wave.shape[0] == 1:
        wave = wave[0]
    if wave.ndim != 1:
        raise InputError(f"the audio encoder takes one mono 16 kHz waveform [samples]; got shape {wave.shape}.")
    return wave


# -- time grids -------------------------------------------------------------------------------
def interpolate_to_video_rate(
    features: torch.Tensor, input_rate: int = FEATURE_RATE, output_rate: int = VIDEO_RATE
) -> torch.Tensor:
    """`[L, T_in, C]` -> `[L, int(T_in / input_rate * output_rate), C]`, linear with aligned
    corners (the official `linear_interpolation`)."""
    steps = int(features.shape[1] / float(input_rate) * output_rate)
    if steps < 1:
        raise InputError(f"the audio is too short: {features.shape[1]} encoder frames give no feature step.")
    resized = F.interpolate(features.transpose(1, 2), size=steps, mode="linear", align_corners=True)
    return resized.transpose(1, 2)


def audio_steps_for_frames(frames: np.ndarray | range, fps: int = FPS, video_rate: int = VIDEO_RATE) -> np.ndarray:
    """The 30-per-second feature step each video frame reads: `round(i * video_rate / fps)`.

    Computed exactly in integers with ties to even, which is what `np.round` gives on the
    official float times at 16 and 25 fps (the ties at 16 fps are exact binary fractions).
    """
    fps = _whole_fps(fps)
    numerator = np.asarray(frames, dtype=np.int64) * int(video_rate)
    quotient, remainder = np.divmod(numerator, fps)
    round_up = (2 * remainder > fps) | ((2 * remainder == fps) & (quotient % 2 == 1))
    return quotient + round_up


def video_frames_with_audio(audio_steps: int, fps: int = FPS, video_rate: int = VIDEO_RATE) -> int:
    """How many video frames read a feature step that exists (the rest get silence)."""
    limit = int(np.ceil(audio_steps * _whole_fps(fps) / video_rate)) + 2
    return int((audio_steps_for_frames(range(limit), fps, video_rate) < audio_steps).sum())


def features_for_frames(
    features: torch.Tensor,
    num_frames: int,
    start: int = 0,
    fps: int = FPS,
    m: int = WINDOW_NEIGHBOURS,
    video_rate: int = VIDEO_RATE,
) -> torch.Tensor:
    """The DiT's `audio_input` for video frames `start .. start + num_frames - 1`.

    Args:
        features: `[L, T30, C]` from `AudioEncoder.hidden_states`.
        num_frames, start: the frame range (a clip: `infer_frames` frames from `clip * infer_frames`).
        fps: the video frame rate (25 for LiveAvatar).
        m: neighbours each side of a frame's step (0 for LiveAvatar).

    Returns:
        `[1, L, (2m+1)*C, num_frames]`, zeros for frames past the audio; equal to the official
        bucketed features in the DiT's layout, `[..., start:start + num_frames]`, wherever
        that is defined.
    """
    if num_frames < 0 or start < 0 or m < 0:
        raise InputError(f"frame range and window must not be negative (start {start}, frames {num_frames}, m {m}).")
    windows = _frame_windows(features, np.arange(start, start + num_frames), fps, m, video_rate)
    return windows.permute(1, 2, 0).unsqueeze(0)


def features_for_video(features: torch.Tensor, fps: int = FPS, m: int = WINDOW_NEIGHBOURS) -> torch.Tensor:
    """`features_for_frames` for every frame that has audio: `[1, L, (2m+1)*C, frames]`."""
    return features_for_frames(features, video_frames_with_audio(features.shape[1], fps), 0, fps, m)


def _frame_windows(features, frames: np.ndarray, fps: int, m: int, video_rate: int) -> torch.Tensor:
    return _windows_at(features, audio_steps_for_frames(frames, fps, video_rate), fps, m, video_rate)


def _windows_at(features: torch.Tensor, steps: np.ndarray, fps: int, m: int, video_rate: int) -> torch.Tensor:
    """`[L, T, C]` and one step per frame -> `[frames, L, (2m+1)*C]`, zeros where the step is past T."""
    if features.dim() != 3:
        raise InputError(f"audio features must be [layers, steps, channels]; got shape {tuple(features.shape)}.")
    available = features.shape[1]
    if available == 0:
        return features.new_zeros(len(steps), features.shape[0], (2 * m + 1) * features.shape[2])
    stride = int(video_rate / fps)  # the official `audio_sample_stride`
    centre = torch.as_tensor(steps, dtype=torch.long)
    chosen = (centre[:, None] + torch.arange(-m, m + 1) * stride).clamp(0, max(available - 1, 0))
    windows = features[:, chosen.to(features.device)]  # [L, frames, 2m+1, C]
    windows = windows.permute(1, 0, 2, 3).flatten(2)
    silent = (centre >= available).to(features.device)
    return windows.masked_fill(silent[:, None, None], 0.0)


def _whole_fps(fps) -> int:
    if int(fps) != fps or fps <= 0:
        raise InputError(f"the video frame rate must be a positive whole number of frames per second; got {fps}.")
    return int(fps)
