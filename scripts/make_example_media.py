"""Draws the example portrait and synthesises the example speech track of the workflows.

Both are made from scratch here (no third-party media) and are deterministic: running the
script again gives the same bytes.

- `liveavatar_example_portrait.png`: a friendly cartoon face, head and shoulders, 512x640,
  on a plain background. The face sits in the middle band of the picture, so the landscape
  presets (688*368, 704*384), which crop the centre, still show eyes and mouth.
- `liveavatar_example_speech.wav`: 4 s of speech-like sound, 16 kHz mono 16-bit, from a small
  formant synthesiser (glottal pulses with an intonation contour through vowel resonators,
  noise for consonants, pauses between phrases). It follows the rhythm of "Hello, I am your
  live avatar. Nice to meet you!" but is not meant to be understood: it gives the audio
  encoder syllables, pauses and pitch movement, as speech would. A text-to-speech engine was
  not used, so the output does not depend on what is installed.

Usage: python scripts/make_example_media.py [--out-dir workflows/media]
"""

from __future__ import annotations

import argparse
import math
import wave
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parents[1]
PORTRAIT_NAME = "liveavatar_example_portrait.png"
SPEECH_NAME = "liveavatar_example_speech.wav"

# -- portrait ---------------------------------------------------------------------------------
WIDTH, HEIGHT = 512, 640
SUPERSAMPLE = 3  # drawn larger and scaled down, for smooth edges

BACKGROUND = (206, 228, 238)
SKIN = (247, 206, 172)
SKIN_SHADE = (228, 176, 142)
HAIR = (92, 58, 38)
SHIRT = (64, 124, 186)
SHIRT_SHADE = (50, 100, 156)
EYE_WHITE = (255, 255, 255)
IRIS = (74, 120, 92)
PUPIL = (28, 24, 22)
LINE = (70, 44, 32)
MOUTH = (140, 38, 50)
TONGUE = (232, 110, 116)
BLUSH = (244, 150, 150, 90)


def draw_portrait() -> Image.Image:
    s = SUPERSAMPLE

    def box(x0, y0, x1, y1):
        return [x0 * s, y0 * s, x1 * s, y1 * s]

    def pts(*xy):
        return [(x * s, y * s) for x, y in xy]

    image = Image.new("RGB", (WIDTH * s, HEIGHT * s), BACKGROUND)
    d = ImageDraw.Draw(image)

    # Shoulders and shirt, then the neck and the V of the collar.
    d.ellipse(box(40, 470, 472, 830), fill=SHIRT)
    d.ellipse(box(70, 510, 150, 670), fill=SHIRT_SHADE)
    d.ellipse(box(362, 510, 442, 670), fill=SHIRT_SHADE)
    d.ellipse(box(40, 470, 472, 830), outline=SHIRT_SHADE, width=4 * s)
    d.rectangle(box(220, 380, 292, 490), fill=SKIN_SHADE)
    d.polygon(pts((210, 470), (302, 470), (256, 548)), fill=SKIN_SHADE)
    d.line(pts((198, 470), (256, 552), (314, 470)), fill=SHIRT_SHADE, width=8 * s, joint="curve")

    # Hair behind the head, ears, head.
    d.ellipse(box(132, 118, 380, 380), fill=HAIR)
    d.ellipse(box(124, 262, 166, 330), fill=SKIN_SHADE)
    d.ellipse(box(346, 262, 388, 330), fill=SKIN_SHADE)
    d.ellipse(box(146, 150, 366, 430), fill=SKIN)
    d.ellipse(box(146, 150, 366, 430), outline=SKIN_SHADE, width=2 * s)

    # Fringe: a cap across the top of the head with rounded locks along its edge.
    d.chord(box(138, 122, 374, 300), 180, 360, fill=HAIR)
    for x0, y0, x1, y1 in ((148, 180, 214, 244), (196, 178, 262, 236), (248, 178, 314, 232), (298, 180, 364, 244)):
        d.ellipse(box(x0, y0, x1, y1), fill=HAIR)

    # Eyebrows, eyes (white, iris, pupil, highlight, lid line).
    for cx in (211, 301):
        d.arc(box(cx - 26, 244, cx + 26, 272), 200, 340, fill=LINE, width=6 * s)
        d.ellipse(box(cx - 22, 270, cx + 22, 302), fill=EYE_WHITE, outline=LINE, width=2 * s)
        d.ellipse(box(cx - 12, 274, cx + 12, 298), fill=IRIS)
        d.ellipse(box(cx - 6, 280, cx + 6, 292), fill=PUPIL)
        d.ellipse(box(cx - 7, 277, cx - 1, 283), fill=EYE_WHITE)
        d.arc(box(cx - 23, 268, cx + 23, 304), 195, 345, fill=LINE, width=3 * s)

    # Nose.
    d.arc(box(242, 308, 270, 336), 20, 160, fill=SKIN_SHADE, width=4 * s)

    # An open smile: the lower half of an ellipse, upper teeth along its top, tongue, corners.
    d.chord(box(216, 330, 296, 400), 0, 180, fill=MOUTH)
    d.chord(box(226, 357, 286, 373), 0, 180, fill=EYE_WHITE)
    d.chord(box(238, 380, 274, 408), 180, 360, fill=TONGUE)
    d.chord(box(216, 330, 296, 400), 0, 180, outline=LINE, width=3 * s)
    d.arc(box(204, 356, 222, 374), 110, 250, fill=LINE, width=3 * s)
    d.arc(box(290, 356, 308, 374), -70, 70, fill=LINE, width=3 * s)

    # Rosy cheeks, blended over the skin.
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    o = ImageDraw.Draw(overlay)
    o.ellipse(box(168, 316, 212, 344), fill=BLUSH)
    o.ellipse(box(300, 316, 344, 344), fill=BLUSH)
    image = Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB")

    return image.resize((WIDTH, HEIGHT), Image.Resampling.LANCZOS)


# -- speech -----------------------------------------------------------------------------------
RATE = 16000
DURATION_S = 4.0
SEED = 7

# Formant targets F1, F2, F3 in Hz (typical adult values, raised a little for a light voice).
VOWELS = {
    "i": (300, 2300, 2950),
    "I": (420, 1950, 2600),
    "e": (560, 1850, 2550),
    "ae": (720, 1700, 2500),
    "a": (780, 1240, 2550),
    "@": (520, 1450, 2500),
    "o": (520, 920, 2450),
    "u": (330, 920, 2350),
    "U": (460, 1080, 2400),
    "er": (490, 1350, 1700),
}
SONORANTS = {  # (F1, F2, F3, loudness relative to a vowel)
    "m": (260, 1100, 2300, 0.35),
    "n": (260, 1700, 2550, 0.35),
    "l": (360, 1100, 2700, 0.6),
    "y": (290, 2200, 2950, 0.6),
    "r": (420, 1250, 1650, 0.6),
}
FRICATIVES = {  # (centre Hz, bandwidth Hz, loudness, voiced)
    "s": (5200, 1800, 0.22, False),
    "f": (3800, 3500, 0.08, False),
    "v": (3800, 3500, 0.06, True),
}
STOPS = {  # burst (centre Hz, bandwidth Hz), closure ms, burst ms, aspiration ms
    "t": ((4200, 2200), 55, 12, 35),
    "p": ((1000, 1500), 60, 10, 30),
    "k": ((1900, 900), 55, 14, 40),
}

# "Hello, I am your live avatar. Nice to meet you!": (phone, ms, stress) per segment;
# "|" is a pause between phrases. Stress scales loudness and raises the pitch.
UTTERANCE = [
    ("|", 160, 0),
    ("h", 60, 0),
    ("e", 85, 0.6),
    ("l", 55, 0),
    ("o", 170, 1.0),
    ("U", 90, 0.8),
    ("|", 220, 0),
    ("a", 120, 1.0),
    ("i", 80, 0.8),
    ("ae", 90, 0.6),
    ("m", 80, 0),
    ("y", 45, 0),
    ("er", 110, 0.6),
    ("l", 55, 0),
    ("I", 105, 0.8),
    ("v", 70, 0),
    ("ae", 120, 1.0),
    ("v", 55, 0),
    ("@", 65, 0.5),
    ("t", 0, 0),
    ("a", 140, 0.8),
    ("er", 90, 0.6),
    ("|", 300, 0),
    ("n", 70, 0),
    ("a", 125, 1.0),
    ("i", 75, 0.8),
    ("s", 110, 0),
    ("t", 0, 0),
    ("u", 80, 0.5),
    ("m", 70, 0),
    ("i", 160, 1.0),
    ("t", 0, 0),
    ("y", 50, 0),
    ("u", 230, 0.8),
]
# Pitch (Hz) at the start and end of each phrase: it declines through a phrase and falls at its end.
PHRASE_PITCH = [(200, 170), (205, 150), (210, 135)]


def _resonate(x: np.ndarray, freq: np.ndarray, bandwidth: np.ndarray) -> np.ndarray:
    """A second-order resonator (unity gain at 0 Hz) with per-sample frequency and bandwidth."""
    freq = np.broadcast_to(freq, x.shape)
    bandwidth = np.broadcast_to(bandwidth, x.shape)
    c = -np.exp(-2 * math.pi * bandwidth / RATE)
    b = 2 * np.exp(-math.pi * bandwidth / RATE) * np.cos(2 * math.pi * freq / RATE)
    a = 1 - b - c
    y = np.empty_like(x)
    y1 = y2 = 0.0
    for n, (xn, an, bn, cn) in enumerate(zip(x.tolist(), a.tolist(), b.tolist(), c.tolist())):
        yn = an * xn + bn * y1 + cn * y2
        y[n] = yn
        y2, y1 = y1, yn
    return y


def _noise_band(noise: np.ndarray, centre: float, bandwidth: float) -> np.ndarray:
    # The difference tilts the spectrum upwards, as the hiss of a consonant is.
    return np.diff(_resonate(noise, np.array(centre), np.array(bandwidth)), prepend=0.0)


def _smooth(track: np.ndarray, ms: float) -> np.ndarray:
    width = max(1, int(RATE * ms / 1000))
    window = np.hanning(width + 2)[1:-1]
    padded = np.pad(track, (width, width), mode="edge")
    return np.convolve(padded, window / window.sum(), mode="same")[width:-width]


def _expand_stops(utterance):
    """Each stop becomes its closure ("_", silence), burst and aspiration."""
    out = []
    for phone, ms, stress in utterance:
        if phone in STOPS:
            _, closure, burst, aspiration = STOPS[phone]
            out += [("_", closure, 0), (phone, burst, 0), ("h", aspiration, 0)]
        else:
            out.append((phone, ms, stress))
    return out


def synthesise_speech() -> np.ndarray:
    """4 s of speech-like sound at 16 kHz, float32 in [-1, 1]."""
    rng = np.random.default_rng(SEED)
    segments = _expand_stops(UTTERANCE)
    total = int(RATE * DURATION_S)

    voice = np.zeros(total)  # loudness of the glottal source
    aspiration = np.zeros(total)
    frication = {name: np.zeros(total) for name in (*FRICATIVES, *STOPS)}
    anchors_t, anchors_f = [], []  # formant targets at segment centres
    accents = []  # (time s, stress) for the pitch contour
    phrases = [[0.0, None]]
    t = 0
    for phone, ms, stress in segments:
        n = int(RATE * ms / 1000)
        span = slice(t, min(total, t + n))
        centre = (t + n / 2) / RATE
        if phone == "|":
            if t > 0 and phrases[-1][1] is None:
                phrases[-1][1] = t / RATE
                phrases.append([(t + n) / RATE, None])
        elif phone == "h":
            aspiration[span] = 0.25
        elif phone in VOWELS:
            # A syllable-like swell: loud in the middle, softer at the edges.
            shape = np.sin(np.linspace(0.15, math.pi - 0.15, span.stop - span.start)) ** 0.5
            voice[span] = (0.55 + 0.45 * stress) * shape
            anchors_t.append(centre)
            anchors_f.append(VOWELS[phone])
            if stress:
                accents.append((centre, stress))
        elif phone in SONORANTS:
            *formants, loudness = SONORANTS[phone]
            voice[span] = loudness
            anchors_t.append(centre)
            anchors_f.append(formants)
        elif phone in FRICATIVES:
            _, _, loudness, voiced = FRICATIVES[phone]
            frication[phone][span] = loudness
            if voiced:
                voice[span] = 0.25
        elif phone in STOPS:
            frication[phone][span] = 0.5
        t += n
    phrases[-1][1] = phrases[-1][1] or t / RATE
    phrases = [p for p in phrases if p[1] > p[0]]

    times = np.arange(total) / RATE
    # Formants glide between targets (coarticulation); obstruents take their neighbours' values.
    anchors_f = np.array(anchors_f, dtype=float)
    formants = [_smooth(np.interp(times, anchors_t, anchors_f[:, k]), 30) for k in range(3)]

    # Intonation: declination per phrase, a bump on stressed vowels, slow jitter.
    f0 = np.full(total, PHRASE_PITCH[0][0], dtype=float)
    for (start, end), (high, low) in zip(phrases, PHRASE_PITCH):
        inside = (times >= start) & (times < end + 0.3)
        progress = np.clip((times[inside] - start) / (end - start), 0, 1)
        f0[inside] = high + (low - high) * progress**1.5
    for centre, stress in accents:
        f0 += 28 * stress * np.exp(-0.5 * ((times - centre) / 0.06) ** 2)
    f0 *= 1 + 0.01 * _smooth(rng.standard_normal(total), 40) * 8

    # Glottal source: a Rosenberg pulse per period; its derivative stands in for lip radiation.
    phase = np.cumsum(f0 / RATE) % 1.0
    opening, closing = 0.4, 0.16
    flow = np.where(
        phase < opening,
        0.5 * (1 - np.cos(math.pi * phase / opening)),
        np.where(phase < opening + closing, np.cos(0.5 * math.pi * (phase - opening) / closing), 0.0),
    )
    glottal = np.diff(flow, prepend=0.0) * 8
    noise = rng.standard_normal(total)
    voice = _smooth(voice, 20)
    source = glottal * voice + 0.04 * noise * voice + 0.3 * noise * _smooth(aspiration, 8)

    tract = source
    for freq, bandwidth in zip((*formants, np.array(3500.0)), (70, 100, 140, 250)):
        tract = _resonate(tract, freq, np.array(float(bandwidth)))

    # Open vowels ring much louder through the resonators than close ones; even that out to
    # the few decibels real speech shows, keeping the planned syllable envelope.
    level = np.sqrt(_smooth(tract**2, 40))
    planned = _smooth(np.maximum(voice, 0.3 * _smooth(aspiration, 8)), 40)
    tract = tract * planned / (level + 1e-3 * level.max())
    out = tract / max(1e-9, np.abs(tract).max())
    for phone, level in frication.items():
        if level.any():
            centre, bandwidth = FRICATIVES[phone][:2] if phone in FRICATIVES else STOPS[phone][0]
            band = _noise_band(rng.standard_normal(total), centre, bandwidth)
            out = out + _smooth(level, 6) * band / max(1e-9, np.abs(band).max())
    return (0.8 * out / np.abs(out).max()).astype(np.float32)


def write_wav(path: Path, samples: np.ndarray) -> None:
    pcm = np.round(np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(RATE)
        f.writeframes(pcm.tobytes())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", type=Path, default=ROOT / "workflows" / "media")
    args = parser.parse_args(argv)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    portrait = args.out_dir / PORTRAIT_NAME
    draw_portrait().save(portrait, optimize=True)
    speech = args.out_dir / SPEECH_NAME
    write_wav(speech, synthesise_speech())
    for path in (portrait, speech):
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
