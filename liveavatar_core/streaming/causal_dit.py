"""LiveAvatar's causal use of the S2V DiT: a sink prefill, then one block of latent frames
at a time attending to itself, to earlier blocks (KV cache) and to the sink.

Positions roll with generation: a block starting at latent frame `n` gets temporal RoPE
indices n, n+1, ...; the reference frame sits `sink_distance` frames ahead of the block
(never before its base index 30); motion tokens keep their fixed negative indices.

Two options make the calls cheaper without changing what they compute (each can be turned
off): `sink_in_place` reads the sink and the cached frames as one slice of a [sink | ring]
buffer instead of concatenating them (the same output up to rounding: the keys come in
another order), and `cuda_graphs` replays each steady-state call as a captured CUDA graph
(`graphs`). A third, `kv_fp8`, changes the numbers a little: the caches on the device keep
their keys and values in e4m3 with a scale per token and head (`caches.Fp8BlockKVCache`), for
half their memory; with fp8 attention ("fa3-fp8") one fixed scale per head instead, which the
attention reads as it lies (`caches.Fp8HeadKVCache`). A CausalDiT made without them takes the model's (`model.kernels`, by default
LIVEAVATAR_SINK_IN_PLACE=0/1, LIVEAVATAR_CUDA_GRAPHS=0/1, LIVEAVATAR_KV_FP8=0/1; see `dit.kernels`).

Defaults, from one H200 at Standard 688*368 with the fp8 DiT: the sink in place took a block
step from 196 to 191 ms, but gives every step cache room for a sink copy (+20%, 7.6 GiB), so
it is on only where that fits easily (CPUs, GPUs of 100 GiB or more). CUDA graphs took it to
194 ms (190 ms with the sink in place; the same latents bit for bit): the host keeps up with
the GPU at this size, and capturing a run's 16 graphs costs ~4.4 s, so they are off.
"""

from __future__ import annotations

import torch

from ..dit.attention import FP8_BACKENDS
from ..dit.model import VIDEO, WanS2VTransformer
from ..dit.rope import rope_cos_sin
from .caches import BlockKVCache, SinkCache
from .graphs import BlockGraphs

SINK_IN_PLACE_MIN_GIB = 100  # GPUs with less keep concatenating (the caches' +20% may not fit)


def _sink_in_place_fits(device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    return torch.cuda.get_device_properties(device).total_memory >= SINK_IN_PLACE_MIN_GIB * 2**30


class CausalDiT:
    def __init__(
        self,
        model: WanS2VTransformer,
        sink_in_place: bool | None = None,
        cuda_graphs: bool | None = None,
        kv_fp8: bool | None = None,
    ):
        self.model = model
        self.config = model.config
        # None: decided at the first call, from its device.
        self.sink_in_place = model.kernels.sink_in_place if sink_in_place is None else sink_in_place
        self.cuda_graphs = model.kernels.cuda_graphs if cuda_graphs is None else cuda_graphs
        self.kv_fp8 = model.kernels.kv_fp8 if kv_fp8 is None else kv_fp8  # read by the sampler's caches
        self.graphs = BlockGraphs(model)

    @property
    def fp8_attention(self) -> bool:
        """Whether the model's attention reads e4m3 keys and values as they are: e4m3 caches
        are then `caches.Fp8HeadKVCache`s (read by the sampler)."""
        return self.model.kernels.attention in FP8_BACKENDS

    def tokens_per_frame(self, height: int, width: int) -> int:
        _, ph, pw = self.config.patch_size
        return (height // ph) * (width // pw)

    @torch.no_grad()
    def prefill_sink(self, sink: SinkCache, ref: torch.Tensor, motion: torch.Tensor, context: torch.Tensor) -> None:
        """Runs the reference + motion tokens through every block at timestep 0 (attending
        only to themselves, no audio) and keeps each layer's keys and values.

        `context`: text embeddings already projected by `model.embed_text`.
        """
        model = self.model
        tokens, positions = model.embed_sink(ref, motion)
        rope = rope_cos_sin(positions, self.config.head_dim, tokens.device)
        _, modulation = model.embed_time(torch.zeros(1, device=tokens.device))
        modulation = modulation[:, None].expand(tokens.shape[0], -1, -1, -1)

        def capture(layer):
            def kv(raw_k, k, v):
                sink.store(layer, raw_k, v)
                return k, v

            return kv

        with model.running():
            model.run_blocks(tokens.float(), modulation, [tokens.shape[1]], rope, context, None, 0, capture)
        sink.positions = positions.to(tokens.device)
        sink.ref_tokens = self.tokens_per_frame(*ref.shape[-2:])

    def sink_positions(self, sink: SinkCache, first_frame: int, sink_distance: int) -> torch.Tensor:
        """RoPE positions of the sink for a block starting at `first_frame`: the reference frame
        moves to max(base, first_frame + sink_distance); motion tokens stay where they are."""
        positions = sink.positions.clone()
        base = self.config.ref_rope_index
        positions[: sink.ref_tokens, 0] = max(base, first_frame + sink_distance)
        return positions

    def sink_rope(self, sink: SinkCache, first_frame: int, sink_distance: int, device):
        return rope_cos_sin(self.sink_positions(sink, first_frame, sink_distance), self.config.head_dim, device)

    @torch.no_grad()
    def denoise_block(
        self,
        latents: torch.Tensor,
        timestep: float,
        first_frame: int,
        context: torch.Tensor,
        audio: torch.Tensor,
        cache: BlockKVCache,
        sink: SinkCache,
        sink_distance: int,
        cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Velocity for one block of noisy latents [B, 16, f, H, W] at `timestep`.

        `audio`: this block's wav2vec2 features [B, 25, audio_dim, 4f] (encoded per block, as
        LiveAvatar does). Writes the block's keys/values into `cache` at its frames.
        """
        batch, _, frames, height, width = latents.shape
        device = latents.device
        if self.sink_in_place is None:
            self.sink_in_place = _sink_in_place_fits(device)
        inputs = (
            latents,
            torch.full((batch,), float(timestep), device=device),
            self.model.video_positions(frames, height, width, first_frame, device),
            self.sink_positions(sink, first_frame, sink_distance),
            context,
            audio,
            *(() if cond is None else (cond,)),
        )

        def call(*tensors):
            with self.model.running():
                return self._denoise(*tensors[:6], first_frame, cache, sink, tensors[6] if len(tensors) > 6 else None)

        ring = cache.frames * cache.tokens_per_frame
        steady = cache.held_frames(first_frame, frames) * cache.tokens_per_frame == ring
        if self.cuda_graphs and device.type == "cuda" and steady and cache.keys[-1] is not None:
            key = (first_frame % cache.frames, frames, tuple(t.shape for t in inputs), self.sink_in_place)
            return self.graphs.run(cache, key, call, inputs, keep=(sink,))
        return call(*inputs)

    def _denoise(
        self, latents, timesteps, video_positions, sink_positions, context, audio, first_frame, cache, sink, cond
    ):
        model = self.model
        frames, height, width = latents.shape[2:]
        video = model.embed_video(latents, cond) + model.trainable_cond_mask.weight[VIDEO]
        rope = rope_cos_sin(video_positions, self.config.head_dim)
        sink_rope = rope_cos_sin(sink_positions, self.config.head_dim)
        head_emb, modulation = model.embed_time(timesteps)
        in_place = cache.keeps_sink_slot or (self.sink_in_place and cache.reads_sink_in_place)

        def cached(layer):
            def kv(raw_k, k, v):
                sink_k, sink_v = sink.rotated(layer, sink_rope)
                if in_place:
                    return cache.write_and_read_with_sink(layer, first_frame, frames, k, v, sink_k, sink_v)
                keys, values = cache.write_and_read(layer, first_frame, frames, k, v)
                return torch.cat([keys, sink_k.to(keys.dtype)], dim=1), torch.cat(
                    [values, sink_v.to(values.dtype)], dim=1
                )

            return kv

        tokens = video.shape[1]
        x = model.run_blocks(
            video.float(), modulation[:, None], [tokens], rope, context, model.embed_audio(audio), tokens, cached
        )
        out = model.head(x, head_emb[:, None], [tokens])
        return model.unpatchify(out.float(), frames, height, width)
