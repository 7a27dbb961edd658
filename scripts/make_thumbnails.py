"""Draws the template browser's thumbnail of each preset workflow and the pack's registry icon.

- `workflows/<preset>.jpg`: the example portrait with the preset's name and key settings on it.
  ComfyUI's frontend (1.32.x, as served by ComfyUI 0.3.75) asks for a custom-node template's
  thumbnail at `/api/workflow_templates/<pack>/<workflow name>.jpg`: same base name as the JSON,
  always `.jpg` (it does not look for `.png` or `.webp` for custom-node templates).
- `assets/icon.png`: 400x400, the icon the Comfy Registry shows for the pack
  (`[tool.comfy] Icon` in pyproject.toml points at it).

Everything is drawn here from the project's own portrait and Pillow's built-in font, so the
output does not depend on the fonts installed.

Usage: python scripts/make_thumbnails.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

from build_workflows import PRESETS, Preset
from make_example_media import PORTRAIT_NAME, draw_portrait
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parents[1]
THUMB_SIZE = 512  # the template cards are square; 512 stays sharp on high-DPI screens
ICON_SIZE = 400  # the registry asks for a square icon of at most 400x400
JPEG_QUALITY = 85
BAND = (22, 38, 58)
ACCENT = (255, 196, 84)
TEXT = (255, 255, 255)
SUBTEXT = (204, 222, 238)


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def settings_lines(preset: Preset) -> list[str]:
    """What tells the presets apart, in the words of the README's preset table."""
    first = f"{preset.size}  ·  {preset.steps} steps  ·  up to {preset.num_clip} clips"
    extras = []
    if preset.weight_dtype != "bf16":
        extras.append(f"{preset.weight_dtype.split('_')[0]} weights")
    if preset.kv_cache != "gpu":
        extras.append("caches in system RAM")
    if not preset.offload:
        extras.append("weights stay on the GPU")
    if preset.guide_scale:
        extras.append(f"guidance {preset.guide_scale:g}")
    if preset.upscale_model:
        extras.append("every block upscaled 2x")
    if preset.infer_frames != 48:
        extras.append(f"{preset.infer_frames}-frame clips")
    if preset.core_loaders:
        extras.append("umT5, VAE, wav2vec2 from core nodes")
    return [first, "  ·  ".join(extras)] if extras else [first]


def square_portrait(size: int) -> Image.Image:
    """The portrait cropped to a square around the face (it is 512x640, face in the upper middle)."""
    portrait = Image.open(ROOT / "workflows" / "media" / PORTRAIT_NAME).convert("RGB")
    width, height = portrait.size
    top = min(height - width, round(0.06 * height))
    return portrait.crop((0, top, width, top + width)).resize((size, size), Image.Resampling.LANCZOS)


def draw_thumbnail(preset: Preset) -> Image.Image:
    image = square_portrait(THUMB_SIZE)
    lines = settings_lines(preset)
    band_top = THUMB_SIZE - 74 - 30 * len(lines)
    overlay = Image.new("RGBA", image.size, (0, 0, 0, 0))
    o = ImageDraw.Draw(overlay)
    o.rectangle([0, band_top, THUMB_SIZE, THUMB_SIZE], fill=(*BAND, 225))
    o.rectangle([0, band_top, THUMB_SIZE, band_top + 5], fill=(*ACCENT, 255))
    o.rounded_rectangle([16, 16, 176, 54], radius=10, fill=(*BAND, 210))
    image = Image.alpha_composite(image.convert("RGBA"), overlay).convert("RGB")
    d = ImageDraw.Draw(image)
    d.text((30, 21), "LiveAvatar", font=font(24), fill=ACCENT)
    d.text((24, band_top + 16), preset.title, font=font(40), fill=TEXT)
    for i, line in enumerate(lines):
        d.text((26, band_top + 68 + 30 * i), line, font=font(21), fill=SUBTEXT)
    return image


def draw_icon() -> Image.Image:
    """The portrait's face on the accent colour in a rounded square, with a sound wave beside it."""
    s = 2  # drawn at twice the size and scaled down, for smooth edges
    size = ICON_SIZE * s
    icon = Image.new("RGBA", (size, size), (0, 0, 0, 0))
    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rounded_rectangle([0, 0, size - 1, size - 1], radius=80 * s, fill=255)
    face = draw_portrait().crop((80, 110, 512, 542)).resize((size, size), Image.Resampling.LANCZOS)
    icon.paste(face, (0, 0), mask)
    d = ImageDraw.Draw(icon)
    # Three arcs beside the mouth: the speech the avatar follows.
    for i, radius in enumerate((38, 64, 90)):
        cx, cy = 290 * s, 236 * s
        box = [cx - radius * s, cy - radius * s, cx + radius * s, cy + radius * s]
        d.arc(box, -40, 40, fill=(*ACCENT, 255), width=(14 - 3 * i) * s)
    icon = icon.resize((ICON_SIZE, ICON_SIZE), Image.Resampling.LANCZOS)
    return icon.quantize(96, method=Image.Quantize.FASTOCTREE)  # flat colours: a palette keeps it small


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workflows-dir", type=Path, default=ROOT / "workflows")
    parser.add_argument("--icon", type=Path, default=ROOT / "assets" / "icon.png")
    args = parser.parse_args(argv)
    written = []
    for preset in PRESETS:
        path = args.workflows_dir / f"{preset.name}.jpg"
        draw_thumbnail(preset).save(path, quality=JPEG_QUALITY, optimize=True, progressive=True)
        written.append(path)
    args.icon.parent.mkdir(parents=True, exist_ok=True)
    draw_icon().save(args.icon, optimize=True)
    written.append(args.icon)
    for path in written:
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
