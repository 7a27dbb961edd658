"""Synthetic talking faces: the training data of the default model, and the test's faces.

A face is the example portrait's cartoon (`make_example_media.draw_portrait`) drawn from a
`FaceStyle`: its colours, where it sits and how large, and a mouth whose opening goes from 0
(closed lips, a line) to 1 (the example's open smile). A talking clip draws the mouth opening
of each video frame from the speech envelope of the formant synthesiser's speech
(`mouth_track`): loud vowels open it wide, pauses close it.

Everything is drawn in the example portrait's own 512x640 coordinates and mapped to the output
by a zoom and a centre, so zoom 1 with the default centre is exactly the crop `fit_reference`
takes from the portrait.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import make_example_media as media
import numpy as np
from PIL import Image, ImageDraw

CANVAS = (media.WIDTH, media.HEIGHT)
MOUTH_BOX = (204, 332, 308, 412)  # where the mouth moves, in canvas coordinates (default style)
FPS = 25


@dataclass(frozen=True)
class FaceStyle:
    background: tuple = media.BACKGROUND
    skin: tuple = media.SKIN
    skin_shade: tuple = media.SKIN_SHADE
    hair: tuple = media.HAIR
    shirt: tuple = media.SHIRT
    shirt_shade: tuple = media.SHIRT_SHADE
    iris: tuple = media.IRIS
    mouth: tuple = media.MOUTH
    dx: float = 0.0  # the face's offset from the example's place, canvas pixels
    dy: float = 0.0
    size: float = 1.0  # the face's size relative to the example's


def _shade(colour, factor):
    return tuple(int(max(0, min(255, c * factor))) for c in colour)


def random_style(rng: np.random.Generator) -> FaceStyle:
    """A face with other colours, place and size (the example's layout kept)."""

    def colour(lo, hi):
        return tuple(int(v) for v in rng.integers(lo, hi, 3))

    skin = tuple(int(v) for v in np.array(media.SKIN) * rng.uniform(0.45, 1.05) + rng.integers(-20, 20, 3))
    skin = tuple(max(40, min(255, c)) for c in skin)
    shirt = colour(20, 236)
    return FaceStyle(
        background=colour(60, 250),
        skin=skin,
        skin_shade=_shade(skin, 0.88),
        hair=colour(10, 200) if rng.random() < 0.5 else _shade(media.HAIR, rng.uniform(0.3, 2.2)),
        shirt=shirt,
        shirt_shade=_shade(shirt, 0.8),
        iris=colour(20, 200),
        mouth=_shade(
            (140 + rng.integers(-30, 30), 38 + rng.integers(-20, 30), 50 + rng.integers(-20, 30)), rng.uniform(0.6, 1.1)
        ),
        dx=float(rng.uniform(-40, 40)),
        dy=float(rng.uniform(-30, 30)),
        size=float(rng.uniform(0.85, 1.15)),
    )


def draw_face(
    style: FaceStyle,
    opening: float,
    width: int,
    height: int,
    zoom: float = 1.0,
    centre: tuple[float, float] | None = None,
    supersample: int = 2,
) -> Image.Image:
    """The face at `width` x `height` with the mouth `opening` (0..1). zoom 1 and the default
    centre (the canvas centre) show what `fit_reference` crops from a 512x640 portrait."""
    cx, cy = centre if centre is not None else (CANVAS[0] / 2, CANVAS[1] / 2)
    k = zoom * max(width / CANVAS[0], height / CANVAS[1]) * supersample
    fx, fy = 256 + style.dx, 300 + style.dy  # the face's anchor: it scales about this point

    def xy(x, y):
        x = fx + (x - 256) * style.size
        y = fy + (y - 300) * style.size
        return (x - cx) * k + width * supersample / 2, (y - cy) * k + height * supersample / 2

    def box(x0, y0, x1, y1):
        (a, b), (c, d) = xy(x0, y0), xy(x1, y1)
        return [a, b, c, d]

    def pts(*points):
        return [xy(x, y) for x, y in points]

    def w(pixels):
        return max(1, round(pixels * k * style.size))

    s = style
    image = Image.new("RGB", (width * supersample, height * supersample), s.background)
    d = ImageDraw.Draw(image)
    d.ellipse(box(40, 470, 472, 830), fill=s.shirt)
    d.ellipse(box(70, 510, 150, 670), fill=s.shirt_shade)
    d.ellipse(box(362, 510, 442, 670), fill=s.shirt_shade)
    d.ellipse(box(40, 470, 472, 830), outline=s.shirt_shade, width=w(4))
    d.rectangle(box(220, 380, 292, 490), fill=s.skin_shade)
    d.polygon(pts((210, 470), (302, 470), (256, 548)), fill=s.skin_shade)
    d.line(pts((198, 470), (256, 552), (314, 470)), fill=s.shirt_shade, width=w(8), joint="curve")
    d.ellipse(box(132, 118, 380, 380), fill=s.hair)
    d.ellipse(box(124, 262, 166, 330), fill=s.skin_shade)
    d.ellipse(box(346, 262, 388, 330), fill=s.skin_shade)
    d.ellipse(box(146, 150, 366, 430), fill=s.skin)
    d.ellipse(box(146, 150, 366, 430), outline=s.skin_shade, width=w(2))
    d.chord(box(138, 122, 374, 300), 180, 360, fill=s.hair)
    for x0, y0, x1, y1 in ((148, 180, 214, 244), (196, 178, 262, 236), (248, 178, 314, 232), (298, 180, 364, 244)):
        d.ellipse(box(x0, y0, x1, y1), fill=s.hair)
    for ex in (211, 301):
        d.arc(box(ex - 26, 244, ex + 26, 272), 200, 340, fill=media.LINE, width=w(6))
        d.ellipse(box(ex - 22, 270, ex + 22, 302), fill=media.EYE_WHITE, outline=media.LINE, width=w(2))
        d.ellipse(box(ex - 12, 274, ex + 12, 298), fill=s.iris)
        d.ellipse(box(ex - 6, 280, ex + 6, 292), fill=media.PUPIL)
        d.ellipse(box(ex - 7, 277, ex - 1, 283), fill=media.EYE_WHITE)
        d.arc(box(ex - 23, 268, ex + 23, 304), 195, 345, fill=media.LINE, width=w(3))
    d.arc(box(242, 308, 270, 336), 20, 160, fill=s.skin_shade, width=w(4))
    _draw_mouth(d, box, w, s, float(np.clip(opening, 0.0, 1.0)))
    return image.resize((width, height), Image.Resampling.LANCZOS)


def _draw_mouth(d, box, w, style, opening):
    """Closed lips (a smiling line) at 0; at 1 the example's open smile, 35 px deep."""
    depth = 35 * opening
    if depth < 2:
        d.arc(box(222, 345, 290, 370), 20, 160, fill=media.LINE, width=w(3))
    else:
        d.chord(box(216, 365 - depth, 296, 365 + depth), 0, 180, fill=style.mouth)
        teeth = min(8.0, depth * 0.4)
        if teeth >= 1.5:
            d.chord(box(226, 365 - teeth, 286, 365 + teeth), 0, 180, fill=media.EYE_WHITE)
        if depth > 20:
            d.chord(box(238, 365 + depth - 20, 274, 365 + depth + 8), 180, 360, fill=media.TONGUE)
        d.chord(box(216, 365 - depth, 296, 365 + depth), 0, 180, outline=media.LINE, width=w(3))
    d.arc(box(204, 356, 222, 374), 110, 250, fill=media.LINE, width=w(3))
    d.arc(box(290, 356, 308, 374), -70, 70, fill=media.LINE, width=w(3))


def mouth_box(
    style: FaceStyle, width: int, height: int, zoom: float = 1.0, centre: tuple[float, float] | None = None
) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) output pixels of the region the mouth moves in."""
    cx, cy = centre if centre is not None else (CANVAS[0] / 2, CANVAS[1] / 2)
    k = zoom * max(width / CANVAS[0], height / CANVAS[1])
    fx, fy = 256 + style.dx, 300 + style.dy

    def xy(x, y):
        x, y = fx + (x - 256) * style.size, fy + (y - 300) * style.size
        return (x - cx) * k + width / 2, (y - cy) * k + height / 2

    (x0, y0), (x1, y1) = xy(*MOUTH_BOX[:2]), xy(*MOUTH_BOX[2:])
    return max(0, math.floor(x0)), max(0, math.floor(y0)), min(width, math.ceil(x1)), min(height, math.ceil(y1))


# -- speech and mouth -------------------------------------------------------------------------
_VOWELS = list(media.VOWELS)
_CONSONANTS = list(media.SONORANTS) + list(media.FRICATIVES) + list(media.STOPS) + ["h"]


def random_utterance(rng: np.random.Generator, duration_s: float):
    """(utterance, phrase pitches) of random syllables in phrases with pauses between them."""
    segments, pitches, ms = [("|", int(rng.integers(40, 400)), 0)], [], 0
    ms = segments[0][1]
    while ms < duration_s * 1000 - 300:
        high = float(rng.uniform(110, 260))
        pitches.append((high, high * rng.uniform(0.65, 0.95)))
        for _ in range(int(rng.integers(2, 9))):
            if rng.random() < 0.8:
                consonant = str(rng.choice(_CONSONANTS))
                length = 0 if consonant in media.STOPS else int(rng.integers(40, 110))
                segments.append((consonant, length, 0))
                ms += length + (sum(media.STOPS[consonant][1:]) if consonant in media.STOPS else 0)
            length = int(rng.integers(60, 240))
            segments.append((str(rng.choice(_VOWELS)), length, float(rng.choice([0.0, 0.5, 0.8, 1.0]))))
            ms += length
        pause = int(rng.integers(120, 700))
        segments.append(("|", pause, 0))
        ms += pause
    return segments, pitches or [(200.0, 150.0)]


def random_speech(seed: int, duration_s: float = 4.5) -> np.ndarray:
    rng = np.random.default_rng(seed)
    utterance, pitches = random_utterance(rng, duration_s)
    length = sum(ms for _, ms, _ in media._expand_stops(utterance)) / 1000 + 0.1
    wave = media.synthesise_speech(utterance, max(duration_s, length), seed, pitches)
    return (wave[: int(duration_s * media.RATE)] * rng.uniform(0.3, 1.0)).astype(np.float32)


def mouth_track(wave16k: np.ndarray, frames: int, rate: int = media.RATE) -> np.ndarray:
    """Mouth opening 0..1 of each video frame: the speech's loudness over 40 ms around the
    frame, in decibels from 30 dB below the track's peak (0) to 6 dB below it (1)."""
    hop = rate // FPS
    padded = np.pad(np.asarray(wave16k, dtype=np.float64), (hop, hop))
    rms = np.array(
        [np.sqrt(np.mean(padded[i * hop + hop // 2 : i * hop + hop // 2 + 2 * hop] ** 2)) for i in range(frames)]
    )
    level = 20 * np.log10(rms + 1e-6)
    peak = max(level.max(), -60.0)
    opening = np.clip((level - (peak - 30)) / 24, 0, 1)
    return np.convolve(np.pad(opening, 1, mode="edge"), [0.25, 0.5, 0.25], mode="valid")


def default_style() -> FaceStyle:
    return FaceStyle()


__all__ = [
    "FaceStyle",
    "random_style",
    "draw_face",
    "mouth_box",
    "random_speech",
    "mouth_track",
    "default_style",
    "replace",
]
