"""The Wan2.2-S2V / LiveAvatar diffusion transformer."""

from .config import S2VConfig, config_from_shapes
from .loading import load_dit, open_dit_file, save_dit
from .model import WanS2VTransformer

__all__ = ["S2VConfig", "WanS2VTransformer", "config_from_shapes", "load_dit", "open_dit_file", "save_dit"]
