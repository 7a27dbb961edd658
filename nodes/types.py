"""Names of the values that flow between the pack's nodes (ComfyUI matches sockets by name)."""

MODEL = "LIVEAVATAR_MODEL"
AUDIO_FEATURES = "LIVEAVATAR_AUDIO"
PROMPT = "LIVEAVATAR_PROMPT"
VIDEO_STREAM = "LIVEAVATAR_VIDEO_STREAM"
CATEGORY = "LiveAvatar"

# The model socket, as every node after the loader takes it.
MODEL_INPUT = (MODEL, {"tooltip": "From Load LiveAvatar Model."})
