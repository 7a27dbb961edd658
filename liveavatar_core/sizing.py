"""Output size rules: the exact size the user picks, or the official CLI's area budget; and the
portrait fitted to that size.

The official LiveAvatar/Wan2.2-S2V CLI reads `--size 704*384` as a pixel-area budget: the
output follows the reference image's aspect ratio, as large as fits in that area once both
sides are rounded up to multiples of 64. ComfyUI users expect the size they pick, so `exact`
is the default and `official_area` reproduces the CLI.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .errors import InputError
from .limits import check_size

SIZE_MODES = ("exact", "official_area")
AREA_DIVISOR = 64
# The motion context is packed in 8*8-latent patches: 64 pixels per side at least.
MIN_SIDE = 64
# Width*height the official CLI accepts; any multiple of 16 works for the networks.
OFFICIAL_SIZES = (
    "720*1280",
    "1280*720",
    "480*832",
    "832*480",
    "704*1280",
    "1280*704",
    "1024*704",
    "704*1024",
    "720*400",
    "704*384",
    "688*368",
    "384*256",
)


def parse_size(size: str | tuple[int, int]) -> tuple[int, int]:
    """'688*368' or (688, 368) -> (width, height), checked for the networks' 16-pixel grid."""
    if isinstance(size, str):
        try:
            width, height = (int(v) for v in size.lower().replace("x", "*").split("*"))
        except ValueError:
            raise InputError(f"size must look like '688*368' (width*height), got {size!r}.") from None
    else:
        width, height = size
    if width <= 0 or height <= 0 or width % 16 or height % 16:
        raise InputError(
            f"size {width}*{height} is not a multiple of 16 in both directions; pick one of the "
            f"official sizes ({', '.join(OFFICIAL_SIZES)}) or round to multiples of 16."
        )
    check_size(width, height)
    return width, height


def checked_portrait(image: torch.Tensor) -> torch.Tensor:
    """The portrait [H, W, 3 or 4] (the first of a batch), refused when it is not one."""
    if image.dim() == 4:
        image = image[0]
    if image.dim() != 3 or image.shape[-1] not in (3, 4) or min(image.shape[:2]) < 16:
        raise InputError(
            f"reference image must be one RGB image of at least 16*16 pixels, got shape {tuple(image.shape)}."
        )
    return image


def output_size(size: str | tuple[int, int], size_mode: str, image: torch.Tensor) -> tuple[int, int]:
    """(width, height) of the video for `size` under `size_mode` and the portrait [H, W, C]."""
    width, height = parse_size(size)
    if size_mode == "official_area":
        height, width = area_fit_size(image.shape[0], image.shape[1], width * height)
        if min(height, width) < MIN_SIDE:
            raise InputError(
                f"reference image {image.shape[1]}*{image.shape[0]} is too small for size_mode "
                "'official_area'; use 'exact'."
            )
    elif size_mode != "exact":
        raise InputError(f"size_mode must be one of {', '.join(SIZE_MODES)}, got {size_mode!r}.")
    if min(width, height) < MIN_SIDE:
        raise InputError(
            f"size {width}*{height} is too small: both sides must be at least {MIN_SIDE} pixels "
            "(the motion context is packed in 8*8-latent patches)."
        )
    return width, height


def fit_reference(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """[H, W, 3] (or [1, H, W, 3]) image in 0..1 -> [1, 3, 1, height, width] in -1..1.

    Scales so the image covers the target size, then crops the centre (no stretching)."""
    if image.dim() == 4:
        image = image[0]
    pixels = image[..., :3].permute(2, 0, 1)[None].float()
    scale = max(width / pixels.shape[-1], height / pixels.shape[-2])
    new_w, new_h = max(width, round(pixels.shape[-1] * scale)), max(height, round(pixels.shape[-2] * scale))
    pixels = F.interpolate(pixels, size=(new_h, new_w), mode="bicubic", align_corners=False, antialias=True)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    pixels = pixels[..., top : top + height, left : left + width].clamp(0, 1)
    return (pixels * 2 - 1).unsqueeze(2)


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
