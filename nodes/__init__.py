"""ComfyUI nodes of the pack: thin adapters from ComfyUI types to `liveavatar_core`."""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
