"""The wav2vec2 audio encoder, its checkpoint layouts, speech loading and the per-frame audio
features of the DiT, against ComfyUI's own wav2vec2, transformers and the official formulas."""

from __future__ import annotations

import math
import wave

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from transformers import Wav2Vec2Config, Wav2Vec2FeatureExtractor, Wav2Vec2ForCTC

from conftest import FIXTURES, relative_error
from liveavatar_core.audio_encoder import (
    config_from_shapes,
    features_for_frames,
    features_for_video,
    interpolate_to_video_rate,
    load_audio_encoder,
    to_transformers_names,
    video_frames_with_audio,
)
from liveavatar_core.audio_io import audio_dict_to_16k_mono, audio_duration_s, is_silent, load_audio, to_16k_mono
from liveavatar_core.errors import CheckpointError, InputError
from liveavatar_core.tensor_files import open_tensor_file
from liveavatar_core.weights import build_empty
from official_audio import bucket_per_frame, official_clip_count, to_dit_layout

TOLERANCE = 1e-5
SMALL_HIDDEN, SMALL_LAYERS, SMALL_HEADS = 128, 2, 2  # ComfyUI fixes 64 features per head


def speech_like(seconds: float, seed: int = 0) -> torch.Tensor:
    """A 16 kHz test signal: a few tones with a syllable-rate envelope plus noise."""
    t = torch.arange(int(seconds * 16000)) / 16000
    g = torch.Generator().manual_seed(seed)
    tones = sum(torch.sin(2 * math.pi * f * t + p) for f, p in zip((180.0, 420.0, 1250.0), torch.rand(3, generator=g)))
    envelope = 0.5 + 0.5 * torch.sin(2 * math.pi * 4 * t)
    return (0.1 * tones * envelope + 0.01 * torch.randn(t.shape, generator=g)).float()


def randomize(module: torch.nn.Module, seed: int = 1) -> torch.nn.Module:
    """Random weights of a sensible scale (ComfyUI's modules are built without initialising)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias"):
                param.copy_(0.02 * torch.randn(param.shape, generator=g))
            elif "layer_norm.weight" in name or name.endswith("original0"):
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=g))
            else:
                param.copy_(torch.randn(param.shape, generator=g) / max(1, param[0].numel()) ** 0.5)
    return module


def old_weight_norm_names(state: dict) -> dict:
    """The positional conv's weight norm as files written before torch's parametrizations name it."""
    renames = {"parametrizations.weight.original0": "weight_g", "parametrizations.weight.original1": "weight_v"}
    out = {}
    for name, value in state.items():
        for new, old in renames.items():
            name = name.replace(new, old)
        out[name] = value
    return out


# -- equality with ComfyUI's wav2vec2 ----------------------------------------------------------
@pytest.fixture(scope="module")
def comfy_reference(comfyui, tmp_path_factory):
    """ComfyUI's wav2vec2 (small, random), its weights in three layouts, and its hidden states.

    ComfyUI normalises the input itself with the unbiased variance (`x.var()`), the official
    processor with the biased one (`np.var`): a relative difference of about 1/(2 * samples),
    3e-5 for one second. Both are compared here on the same, officially normalised input
    (ComfyUI's model built with `do_normalize=False`).
    """
    import comfy.ops
    from comfy.audio_encoders.wav2vec2 import Wav2Vec2Model as ComfyWav2Vec2

    comfy_model = randomize(
        ComfyWav2Vec2(
            embed_dim=SMALL_HIDDEN,
            num_heads=SMALL_HEADS,
            num_layers=SMALL_LAYERS,
            do_normalize=False,
            operations=comfy.ops.disable_weight_init,
        )
    ).eval()
    state = {k: v.contiguous() for k, v in comfy_model.state_dict().items()}
    folder = tmp_path_factory.mktemp("wav2vec2_files")
    files = {layout: folder / f"layout{i}.safetensors" for i, layout in enumerate(LAYOUTS)}
    save_file(state, files["ComfyUI names"])
    ctc = {f"wav2vec2.{k}": v for k, v in state.items()}
    ctc["lm_head.weight"], ctc["lm_head.bias"] = torch.zeros(32, SMALL_HIDDEN), torch.zeros(32)
    save_file(ctc, files["wav2vec2. prefix and CTC head"])
    save_file(old_weight_norm_names(state), files["weight_g/weight_v names"])
    return comfy_model, files


LAYOUTS = ["ComfyUI names", "wav2vec2. prefix and CTC head", "weight_g/weight_v names"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_all_hidden_states_match_comfyui_wav2vec2(comfy_reference, layout):
    comfy_model, files = comfy_reference
    encoder = load_audio_encoder(files[layout])
    assert encoder.num_hidden_states == SMALL_LAYERS + 1 and encoder.hidden_size == SMALL_HIDDEN
    normalised = encoder.normalize(speech_like(1.0))
    with torch.no_grad():
        _, expected = comfy_model(normalised[:, None])  # [B, channels, samples]
        ours = encoder(normalised)
    assert ours.shape == (SMALL_LAYERS + 1, 49, SMALL_HIDDEN)  # 1 s -> 49 wav2vec2 frames
    assert len(expected) == ours.shape[0]
    for index, state in enumerate(expected):
        error = relative_error(ours[index], state[0])
        print(f"\n[{layout}] hidden state {index}: rel err {error:.3e}")
        assert error <= TOLERANCE


def test_input_normalisation_is_the_official_processors(comfy_reference):
    """Zero mean, unit (biased) variance over the whole track, eps 1e-7, in float32."""
    encoder = load_audio_encoder(comfy_reference[1]["ComfyUI names"])
    raw = speech_like(0.5, seed=3).numpy() * 3 + 0.2
    expected = (raw - raw.mean()) / np.sqrt(raw.var() + 1e-7)
    error = relative_error(encoder.normalize(raw)[0], torch.from_numpy(expected))
    print(f"\nnormalisation rel err {error:.3e}")
    assert error <= TOLERANCE


def test_comfyui_full_size_layout_gives_wav2vec2_large(comfyui):
    """ComfyUI's full-size wav2vec2 names and shapes (built on the meta device) are recognised
    as wav2vec2-large-xlsr-53 and fill transformers' `Wav2Vec2Model` exactly."""
    import comfy.ops
    from comfy.audio_encoders.wav2vec2 import Wav2Vec2Model as ComfyWav2Vec2

    with torch.device("meta"):
        comfy_model = ComfyWav2Vec2(operations=comfy.ops.disable_weight_init)
    shapes = {k: tuple(v.shape) for k, v in comfy_model.state_dict().items()}
    config = config_from_shapes(shapes, "wav2vec2_large_english_fp16.safetensors")
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads) == (1024, 24, 16)
    assert config.intermediate_size == 4096 and config.conv_dim == (512,) * 7
    assert config.conv_kernel == (10, 3, 3, 3, 3, 2, 2) and config.conv_bias
    assert (config.num_conv_pos_embeddings, config.num_conv_pos_embedding_groups) == (128, 16)
    assert config.feat_extract_norm == "layer" and config.do_stable_layer_norm
    from transformers import Wav2Vec2Model

    model = build_empty(lambda: Wav2Vec2Model(config))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == shapes


# -- the official transformers folder ----------------------------------------------------------
def small_ctc_config() -> Wav2Vec2Config:
    """wav2vec2-large-xlsr-53-english's settings at a small size."""
    return Wav2Vec2Config(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=96,
        conv_dim=(32,) * 7,
        conv_bias=True,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        vocab_size=33,
        mask_time_prob=0.05,
    )


@pytest.fixture(scope="module")
def official_folders(tmp_path_factory):
    """A small `Wav2Vec2ForCTC` saved as the official folder: with save_pretrained
    (model.safetensors), and as an old pytorch_model.bin with weight_g/weight_v names."""
    torch.manual_seed(0)
    model = Wav2Vec2ForCTC(small_ctc_config()).eval()
    extractor = Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=16000, padding_value=0.0, do_normalize=True, return_attention_mask=True
    )
    safetensors_folder = tmp_path_factory.mktemp("wav2vec2-large-xlsr-53-english")
    model.save_pretrained(safetensors_folder)
    extractor.save_pretrained(safetensors_folder)
    bin_folder = tmp_path_factory.mktemp("wav2vec2-old-bin")
    model.config.save_pretrained(bin_folder)
    extractor.save_pretrained(bin_folder)
    torch.save(old_weight_norm_names(model.state_dict()), bin_folder / "pytorch_model.bin")
    return model, extractor, {"model.safetensors": safetensors_folder, "pytorch_model.bin": bin_folder}


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_official_folder_loads_the_encoder_and_equals_transformers(official_folders, weights):
    reference, extractor, folders = official_folders
    assert any(k.startswith("lm_head.") for k in open_tensor_file(folders[weights] / weights).keys())
    encoder = load_audio_encoder(folders[weights])
    assert not hasattr(encoder.model, "lm_head")
    audio = speech_like(1.0, seed=2)
    expected_input = torch.from_numpy(extractor(audio.numpy(), sampling_rate=16000, return_tensors="np").input_values)
    with torch.no_grad():
        out = reference.wav2vec2(expected_input, output_hidden_states=True)
        ours = encoder.hidden_states_50hz(audio)
    # Every state is what transformers returns; the last is taken after the final layer norm,
    # as transformers 4.x (pinned by Wan2.2) returned it.
    expected = list(out.hidden_states[:-1]) + [out.last_hidden_state]
    assert ours.shape[0] == len(expected) == 3
    for index, state in enumerate(expected):
        error = relative_error(ours[index], state[0])
        print(f"\n[{weights}] hidden state {index}: rel err {error:.3e}")
        assert error <= TOLERANCE


def test_loads_in_bfloat16_and_returns_float32_features(official_folders):
    folder = official_folders[2]["model.safetensors"]
    full = load_audio_encoder(folder)
    half = load_audio_encoder(folder, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    audio = speech_like(1.0, seed=4)
    expected, features = full.hidden_states(audio), half.hidden_states(audio)
    assert features.dtype == torch.float32
    error = relative_error(features, expected)
    print(f"\nbfloat16 features rel err {error:.3e}")
    assert error < 3e-2


# -- time grids: 50 Hz -> 30 per second -> one window per video frame -------------------------
def official_interpolation(features: np.ndarray) -> np.ndarray:
    """The official `linear_interpolation` from its formula: output j sits at input position
    j * (T_in - 1) / (T_out - 1) (aligned corners), T_out = int(T_in / 50 * 30).

    The official call computes that position in float32 (scale, then scale * j); so does this
    reference, or long tracks would differ by float32 rounding of the position alone."""
    steps_in = features.shape[1]
    steps_out = int(steps_in / 50.0 * 30)
    scale = np.float32((steps_in - 1) / max(steps_out - 1, 1))
    positions = (scale * np.arange(steps_out, dtype=np.float32)).astype(np.float64)
    out = np.empty((features.shape[0], steps_out, features.shape[2]))
    for layer in range(features.shape[0]):
        for channel in range(features.shape[2]):
            out[layer, :, channel] = np.interp(positions, np.arange(steps_in), features[layer, :, channel])
    return out


def official_buckets(features: np.ndarray, fps: int, batch_frames: int, m: int, video_rate: int = 30):
    """The official `get_sample_indices` + `get_audio_embed_bucket_fps`, restated in numpy."""
    layers, steps, dim = features.shape
    clips = int(steps / (batch_frames * (video_rate / fps))) + 1
    count = clips * batch_frames
    padded = math.ceil(count / fps * video_rate)
    times = np.linspace(0, count / fps, count, endpoint=False)
    centres = np.clip(np.round(times * video_rate).astype(int), 0, padded - 1)
    stride = int(video_rate / fps)
    rows = []
    for centre in centres:
        if centre < steps:
            chosen = [min(max(c, 0), steps - 1) for c in range(centre - m * stride, centre + (m + 1) * stride, stride)]
            rows.append(features[:, chosen].reshape(layers, -1))
        else:
            rows.append(np.zeros((layers, dim * (2 * m + 1))))
    return np.stack(rows), clips


@pytest.mark.parametrize("frames_50hz", [49, 149, 150, 499])
def test_interpolation_to_30_per_second_matches_the_official_formula(frames_50hz):
    features = torch.randn(3, frames_50hz, 8, generator=torch.Generator().manual_seed(frames_50hz))
    ours = interpolate_to_video_rate(features)
    expected = official_interpolation(features.double().numpy())
    assert ours.shape == expected.shape == (3, int(frames_50hz / 50 * 30), 8)
    error = relative_error(ours, torch.from_numpy(expected))
    print(f"\n[{frames_50hz} frames at 50 Hz] interpolation rel err {error:.3e}")
    assert error <= TOLERANCE


@pytest.mark.parametrize(
    ("fps", "batch_frames", "m", "steps"),
    [(25, 48, 0, 89), (25, 48, 0, 576), (25, 48, 1, 130), (16, 80, 0, 200), (16, 80, 2, 61)],
)
def test_per_frame_bucketing_matches_the_official_formula(fps, batch_frames, m, steps):
    features = torch.randn(4, steps, 6, generator=torch.Generator().manual_seed(steps))
    buckets, clips = bucket_per_frame(features, fps=fps, batch_frames=batch_frames, m=m)
    expected, expected_clips = official_buckets(features.double().numpy(), fps, batch_frames, m)
    assert clips == expected_clips == official_clip_count(steps, fps, batch_frames)
    assert buckets.shape == expected.shape == (clips * batch_frames, 4, 6 * (2 * m + 1))
    error = relative_error(buckets, torch.from_numpy(expected))
    print(f"\n[{fps} fps, {batch_frames} frames, m={m}, {steps} steps] bucketing rel err {error:.3e}")
    assert error <= TOLERANCE
    # Any frame range equals the official tensor in the DiT's layout, and is silent past it.
    dit = to_dit_layout(buckets)
    start = batch_frames // 2
    count = min(batch_frames, dit.shape[-1] - start)
    assert torch.equal(features_for_frames(features, count, start, fps, m), dit[..., start : start + count])
    beyond = features_for_frames(features, 5, clips * batch_frames, fps, m)
    assert beyond.shape == (1, 4, 6 * (2 * m + 1), 5) and not beyond.any()
    # The frames that carry audio are exactly the official tensor's non-silent prefix.
    with_audio = features_for_video(features, fps, m)
    carrying = int(expected.reshape(expected.shape[0], -1).any(axis=1).sum())
    assert with_audio.shape[-1] == carrying == video_frames_with_audio(steps, fps)
    assert torch.equal(with_audio, dit[..., :carrying])


def test_bucketing_matches_comfyui_at_25_fps(comfyui):
    from comfy_extras.nodes_wan import get_audio_embed_bucket_fps, linear_interpolation

    features = torch.randn(25, 149, 16, generator=torch.Generator().manual_seed(9))
    grid = interpolate_to_video_rate(features)
    assert torch.equal(grid, linear_interpolation(features, input_fps=50, output_fps=30))
    expected, expected_clips = get_audio_embed_bucket_fps(grid, fps=25, batch_frames=48, m=0, video_rate=30)
    ours, clips = bucket_per_frame(grid, fps=25, batch_frames=48)
    assert clips == expected_clips and torch.equal(ours, expected)


def test_frame_count_for_a_given_duration(official_folders):
    """3 s of speech: 149 wav2vec2 frames -> 89 steps -> 74 video frames at 25 fps with audio;
    the official code renders 2 clips of 48 frames (96), the last 22 of them silent."""
    encoder = load_audio_encoder(official_folders[2]["model.safetensors"])
    audio = speech_like(3.0, seed=5)
    samples = audio.shape[0]
    frames_50hz = (samples - 400) // 320 + 1  # conv stack: 400-sample window, 320-sample hop
    steps = int(frames_50hz / 50.0 * 30)
    frames = sum(1 for i in range(10_000) if round(i * 30 / 25) < steps)
    assert (encoder.frames_50hz(samples), steps, frames) == (149, 89, 74)
    features = encoder.hidden_states(audio)
    assert features.shape == (3, steps, 64)
    assert video_frames_with_audio(steps, 25) == frames
    assert official_clip_count(steps, 25, 48) == 2
    dit_input = encoder.features_for_video(audio)
    assert dit_input.shape == (1, 3, 64, frames) and dit_input.dtype == torch.float32


# -- speech files and ComfyUI AUDIO -------------------------------------------------------------
def write_wav(path, samples: np.ndarray, rate: int) -> None:
    """int16 wav from [channels, samples] floats in -1..1."""
    pcm = np.clip(np.round(samples.T * 32767), -32768, 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(samples.shape[0])
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(pcm.tobytes())


@pytest.mark.slow
def test_stereo_44k_wav_loads_as_16k_mono(tmp_path):
    seconds, rate = 1.5, 44100
    t = np.arange(int(seconds * rate)) / rate
    tone = np.sin(2 * np.pi * 440 * t)
    write_wav(tmp_path / "speech.wav", np.stack([0.5 * tone, 0.25 * tone]), rate)
    loaded = load_audio(tmp_path / "speech.wav")
    assert loaded.dtype == torch.float32 and loaded.dim() == 1
    assert loaded.shape[0] == math.ceil(len(t) * 16000 / rate) == 24000
    assert audio_duration_s(loaded) == pytest.approx(seconds)
    # Channels are averaged (0.375 * tone) and resampled; the ends hold the filter's ramps.
    expected = 0.375 * np.sin(2 * np.pi * 440 * np.arange(24000) / 16000)
    error = relative_error(loaded[800:-800], torch.from_numpy(expected[800:-800]))
    print(f"\nstereo 44.1 kHz -> 16 kHz mono vs analytic tone: rel err {error:.3e}")
    assert error < 1e-2
    # ComfyUI's AUDIO of the same file gives the same samples as reading the file.
    pcm = np.round(np.stack([0.5 * tone, 0.25 * tone]) * 32767) / 32768
    from_comfy = audio_dict_to_16k_mono({"waveform": torch.from_numpy(pcm).float()[None], "sample_rate": rate})
    error = relative_error(from_comfy, loaded)
    print(f"AUDIO dict vs file: rel err {error:.3e}")
    assert error <= TOLERANCE


def test_container_libsndfile_cannot_read_is_decoded(tmp_path):
    """A .m4a (phone recordings, video exports) decodes to the same 16 kHz mono as a wav of
    the same samples (lossless ALAC here, so the samples are known exactly)."""
    import av

    rate = 44100
    tone = 0.5 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate)
    pcm = np.round(np.stack([tone, 0.5 * tone]) * 32767).astype(np.int16)
    with av.open(str(tmp_path / "voice.m4a"), "w") as container:
        stream = container.add_stream("alac", rate=rate, layout="stereo")
        frame = av.AudioFrame.from_ndarray(pcm, format="s16p", layout="stereo")
        frame.rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            container.mux(packet)
    loaded = load_audio(tmp_path / "voice.m4a")
    expected = to_16k_mono(torch.from_numpy(pcm / 32768.0), rate)
    assert loaded.shape == expected.shape == (16000,)
    error = relative_error(loaded, expected)
    print(f"\n.m4a (ALAC) vs the same samples in memory: rel err {error:.3e}")
    assert error <= TOLERANCE


def test_undecodable_file_is_named(tmp_path):
    (tmp_path / "notes.wav").write_text("not audio at all")
    with pytest.raises(InputError, match=r"notes\.wav could not be decoded"):
        load_audio(tmp_path / "notes.wav")


def test_16k_mono_is_passed_through_unchanged():
    audio = speech_like(0.5)
    assert torch.equal(to_16k_mono(audio[None, None], 16000), audio)


def test_empty_audio_is_refused_naming_the_input(tmp_path):
    with pytest.raises(InputError, match="speech_track is empty"):
        to_16k_mono(torch.zeros(1, 2, 0), 44100, name="speech_track")
    write_wav(tmp_path / "empty.wav", np.zeros((2, 0)), 44100)
    with pytest.raises(InputError, match="empty.wav"):
        load_audio(tmp_path / "empty.wav")
    with pytest.raises(InputError, match="too short"):
        to_16k_mono(torch.zeros(1, 1, 200), 16000)
    with pytest.raises(InputError, match="NaN"):
        to_16k_mono(torch.full((1, 1, 16000), float("nan")), 16000)
    with pytest.raises(InputError, match="batch of 2"):
        to_16k_mono(torch.zeros(2, 1, 16000), 16000)
    with pytest.raises(InputError, match="does not exist"):
        load_audio(tmp_path / "missing.wav")


def test_silence_is_accepted_and_reported(comfy_reference):
    silence = to_16k_mono(torch.zeros(1, 2, 44100), 44100)
    assert is_silent(silence) and not is_silent(speech_like(0.5))
    features = load_audio_encoder(comfy_reference[1]["ComfyUI names"]).hidden_states(silence)
    assert torch.isfinite(features).all()


# -- wrong files ------------------------------------------------------------------------------
def test_vae_file_as_audio_encoder_is_refused(tmp_path):
    names = [line.split("\t")[0] for line in (FIXTURES / "vae_keys.tsv").read_text().splitlines()[:12]]
    save_file({name: torch.zeros(2, 2) for name in names}, tmp_path / "wan_2.1_vae.safetensors")
    message = r"wan_2\.1_vae\.safetensors.*not a wav2vec2.*wav2vec2-large-xlsr-53-english"
    with pytest.raises(CheckpointError, match=message):
        load_audio_encoder(tmp_path / "wan_2.1_vae.safetensors")


def test_whisper_file_is_named_as_such(tmp_path):
    save_file({"model.encoder.embed_positions.weight": torch.zeros(4, 4)}, tmp_path / "whisper_large_v3.safetensors")
    with pytest.raises(CheckpointError, match="Whisper"):
        load_audio_encoder(tmp_path / "whisper_large_v3.safetensors")


def test_missing_tensors_are_listed(comfy_reference, tmp_path):
    tensors = open_tensor_file(comfy_reference[1]["ComfyUI names"]).to_dict()
    del tensors["encoder.layers.1.attention.q_proj.weight"]
    save_file(tensors, tmp_path / "cut.safetensors")
    message = r"cut\.safetensors.*1 missing.*encoder\.layers\.1\.attention\.q_proj\.weight"
    with pytest.raises(CheckpointError, match=message):
        load_audio_encoder(tmp_path / "cut.safetensors")


def test_encoder_of_another_size_is_refused_for_the_dit(comfy_reference):
    path = comfy_reference[1]["ComfyUI names"]
    with pytest.raises(CheckpointError, match="expects 25 of 1024"):
        load_audio_encoder(path, expected_hidden_size=1024, expected_hidden_states=25)
    assert load_audio_encoder(path, expected_hidden_size=SMALL_HIDDEN).hidden_size == SMALL_HIDDEN


def test_heads_are_dropped_and_names_converted(comfy_reference):
    view = to_transformers_names(open_tensor_file(comfy_reference[1]["wav2vec2. prefix and CTC head"]))
    assert not any(k.startswith(("lm_head", "wav2vec2.")) for k in view.keys())
    assert "encoder.pos_conv_embed.conv.parametrizations.weight.original1" in view
