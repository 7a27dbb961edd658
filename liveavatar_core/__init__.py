"""LiveAvatar in plain PyTorch: the Wan2.2-S2V networks, their checkpoint files, and the
streaming pipeline. Never imports ComfyUI (the `nodes` package adapts it)."""
