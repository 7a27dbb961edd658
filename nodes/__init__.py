"""ComfyUI nodes of the pack: thin adapters from ComfyUI types to `liveavatar_core`."""

from .decode import OnlineVAEDecode
from .encode import EncodeAudio, EncodePrompt, LiveAvatarPromptFromConditioning
from .live_routes import add_routes
from .loader import LoadLiveAvatarModel
from .postprocess import LiveAvatarStreamFaceRestore, LiveAvatarStreamUpscale
from .sampler import LiveAvatarSampler

_NODES = (
    LoadLiveAvatarModel,
    EncodeAudio,
    EncodePrompt,
    LiveAvatarPromptFromConditioning,
    LiveAvatarSampler,
    LiveAvatarStreamUpscale,
    LiveAvatarStreamFaceRestore,
    OnlineVAEDecode,
)

NODE_CLASS_MAPPINGS = {node.__name__: node for node in _NODES}
NODE_DISPLAY_NAME_MAPPINGS = {node.__name__: node.DISPLAY_NAME for node in _NODES}

add_routes()  # the live view, where ComfyUI's server runs
