"""Output size rules: the exact size the user picks, or the official CLI's area budget.

The official LiveAvatar/Wan2.2-S2V CLI reads `--size 704*384` as a pixel-area budget: the
output follows the reference image's aspect ratio, as large as fits in that area once both
sides are rounded up to multiples of 64. ComfyUI users expect the size they pick, so `exact`
is the default and `official_area` reproduces the CLI.
"""

from __future__ import annotations

import math

SIZE_MODES = ("exact", "official_area")
AREA_DIVISOR = 64


def area_fit_size(image_height: int, image_width: int, area: int, divisor: int = AREA_DIVISOR) -> tuple[int, int]:
    """(height, width) as the official CLI derives them from the image size and area budget.

    Tries 100 scales from the largest (the image scaled to the full area) down to the one
    where rounding up to `divisor` still fits, and keeps the first that fits.
    """
    if image_height * image_width <= area:
        low, high = 0.1, 1.0
    else:
        d = divisor - 1
        a, b, c = image_height * image_width, d * (image_height + image_width), d * d - area
        # Smallest useful scale: where the area with the worst-case rounding equals the budget.
        low = (-b + math.sqrt(b * b - 2 * a * c)) / (2 * a)
        high = math.sqrt(area / (image_height * image_width))
    for i in range(100):
        scale = high - (high - low) * i / 100
        height = _round_up(int(image_height * scale), divisor)
        width = _round_up(int(image_width * scale), divisor)
        if height * width <= area:
            return height, width
    ratio = image_width / image_height
    width = int(math.sqrt(area * ratio) // divisor * divisor)
    height = int(math.sqrt(area / ratio) // divisor * divisor)
    if width >= image_width or height >= image_height:
        width, height = image_width // divisor * divisor, image_height // divisor * divisor
    return height, width


def _round_up(value: int, divisor: int) -> int:
    return value + (divisor - value % divisor) % divisor
