"""ComfyUI-LiveAvatar: ComfyUI entry point. The nodes live in `nodes/`, the model in `liveavatar_core/`."""

import os
import sys

# The core is imported by its own name (not as a sub-package of this folder, whose name
# varies with how the pack was installed), so worker processes can import it too.
_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

if __package__:  # loaded by ComfyUI as a custom node package
    from .nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
else:  # imported as a plain module, e.g. by pytest collecting the repository root
    NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS = {}, {}

WEB_DIRECTORY = None
__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
