"""Names of the values that flow between the pack's nodes (ComfyUI matches sockets by name)."""

MODEL = "LIVEAVATAR_MODEL"
AUDIO_FEATURES = "LIVEAVATAR_AUDIO"
PROMPT = "LIVEAVATAR_PROMPT"
VIDEO_STREAM = "LIVEAVATAR_VIDEO_STREAM"
CATEGORY = "LiveAvatar"
