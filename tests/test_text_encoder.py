"""The umT5-XXL text encoder: checkpoint layouts, fp8 files, tokenisation, and ComfyUI's own umT5."""

from __future__ import annotations

import ast
import io
import random

import pytest
import torch
from safetensors.torch import save_file

from conftest import FIXTURES, relative_error
from liveavatar_core.errors import CheckpointError, InputError
from liveavatar_core.tensor_files import TensorFile
from liveavatar_core.text_encoder import build_umt5_encoder, load_text_encoder, umt5_xxl_config
from liveavatar_core.text_weights import DequantizedTensors, config_from_shapes, to_transformers_names
from liveavatar_core.weights import build_empty, check_tensor_names

TOLERANCE = 1e-5
TINY = {"vocab": 256, "d_model": 64, "d_kv": 16, "heads": 4, "d_ff": 96, "layers": 2}
LINEARS = (
    "SelfAttention.q",
    "SelfAttention.k",
    "SelfAttention.v",
    "SelfAttention.o",
    "DenseReluDense.wi_0",
    "DenseReluDense.wi_1",
    "DenseReluDense.wo",
)

# ComfyUI's (= transformers') names -> Wan's, per layer. Wan applies the GELU to `ffn.gate`,
# transformers to `wi_0`; Wan's `fc1` is the linear half.
COMFYUI_TO_WAN_BLOCK = {
    "layer.0.layer_norm.weight": "norm1.weight",
    "layer.0.SelfAttention.q.weight": "attn.q.weight",
    "layer.0.SelfAttention.k.weight": "attn.k.weight",
    "layer.0.SelfAttention.v.weight": "attn.v.weight",
    "layer.0.SelfAttention.o.weight": "attn.o.weight",
    "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
    "layer.1.layer_norm.weight": "norm2.weight",
    "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
    "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
    "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
}
PROMPTS = [
    "a woman smiles at the camera in natural light",
    "the quick brown fox jumps over the lazy dog while a talking avatar speaks clearly",
]


def read_tsv(path) -> dict[str, tuple[int, ...]]:
    rows = (line.split("\t") for line in path.read_text().splitlines() if line)
    return {name: tuple(ast.literal_eval(shape)) for name, shape in rows}


def in_memory(label: str, tensors: dict[str, torch.Tensor]) -> TensorFile:
    return TensorFile(label, {k: (label, k) for k in tensors}, {label: tensors})


# --- tiny models and files ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def sentencepiece_model() -> bytes:
    """A small umT5-style sentencepiece model (pad 0, end 1, unknown 2), trained here."""
    import sentencepiece

    words = (
        "the quick brown fox jumps over lazy dog a talking avatar speaks clearly in bright studio "
        "hello world how are you today woman man smiles looks at camera natural light portrait"
    ).split()
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(300)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=200,
        hard_vocab_limit=False,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        minloglevel=2,
    )
    return model.getvalue()


@pytest.fixture(scope="module")
def comfyui_state() -> dict[str, torch.Tensor]:
    """Random float32 weights of a tiny umT5 encoder in ComfyUI's names."""
    g = torch.Generator().manual_seed(0)
    d, ff, inner = TINY["d_model"], TINY["d_ff"], TINY["heads"] * TINY["d_kv"]
    shapes = {"shared.weight": (TINY["vocab"], d), "encoder.final_layer_norm.weight": (d,)}
    for i in range(TINY["layers"]):
        block = f"encoder.block.{i}."
        shapes.update(
            {
                block + "layer.0.layer_norm.weight": (d,),
                block + "layer.0.SelfAttention.q.weight": (inner, d),
                block + "layer.0.SelfAttention.k.weight": (inner, d),
                block + "layer.0.SelfAttention.v.weight": (inner, d),
                block + "layer.0.SelfAttention.o.weight": (d, inner),
                block + "layer.0.SelfAttention.relative_attention_bias.weight": (32, TINY["heads"]),
                block + "layer.1.layer_norm.weight": (d,),
                block + "layer.1.DenseReluDense.wi_0.weight": (ff, d),
                block + "layer.1.DenseReluDense.wi_1.weight": (ff, d),
                block + "layer.1.DenseReluDense.wo.weight": (d, ff),
            }
        )
    state = {}
    for name, shape in shapes.items():
        if name.endswith("layer_norm.weight"):
            state[name] = 1 + 0.2 * torch.randn(shape, generator=g)
        elif "relative_attention_bias" in name or name == "shared.weight":
            state[name] = torch.randn(shape, generator=g)
        else:  # small weights, so fp8 scales are far from 1
            state[name] = torch.randn(shape, generator=g) * 0.3 / shape[1] ** 0.5
    return state


def to_wan_layout(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    wan = {"token_embedding.weight": state["shared.weight"], "norm.weight": state["encoder.final_layer_norm.weight"]}
    for i in range(TINY["layers"]):
        for comfy_name, wan_name in COMFYUI_TO_WAN_BLOCK.items():
            wan[f"blocks.{i}.{wan_name}"] = state[f"encoder.block.{i}.{comfy_name}"]
    return wan


def comfyui_umt5(comfy, state: dict[str, torch.Tensor], operations=None, dtype=torch.float32):
    """ComfyUI's own umT5 encoder (comfy.text_encoders.t5.T5, as its Wan text encoder builds it)."""
    import comfy.ops
    import comfy.text_encoders.t5

    config = {
        "d_ff": TINY["d_ff"],
        "d_kv": TINY["d_kv"],
        "d_model": TINY["d_model"],
        "num_heads": TINY["heads"],
        "num_layers": TINY["layers"],
        "vocab_size": TINY["vocab"],
        "dense_act_fn": "gelu_pytorch_tanh",
        "is_gated_act": True,
        "model_type": "umt5",
    }
    model = comfy.text_encoders.t5.T5(config, dtype, "cpu", operations or comfy.ops.manual_cast)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    return model.eval()


def run_comfyui(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, mask)[0]


@pytest.fixture(scope="module")
def wan_pth(tmp_path_factory, comfyui_state, sentencepiece_model):
    """The tiny encoder in the official layout: the .pth plus google/umt5-xxl/ beside it."""
    import sentencepiece
    from transformers import T5Tokenizer

    folder = tmp_path_factory.mktemp("Wan2.2-S2V-tiny")
    path = folder / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(to_wan_layout(comfyui_state), path)
    sp = sentencepiece.SentencePieceProcessor(model_proto=sentencepiece_model)
    vocab = [(sp.id_to_piece(i), sp.get_score(i)) for i in range(sp.get_piece_size())]
    T5Tokenizer(vocab=vocab, extra_ids=0).save_pretrained(folder / "google" / "umt5-xxl")
    return path


@pytest.fixture(scope="module")
def comfyui_file(tmp_path_factory, comfyui_state, sentencepiece_model):
    """The tiny encoder as ComfyUI repackages it: transformers' names, fp16, its own tokenizer."""
    path = tmp_path_factory.mktemp("text_encoders") / "umt5_xxl_fp16.safetensors"
    state = {k: v.half() for k, v in comfyui_state.items()}
    state["spiece_model"] = torch.frombuffer(bytearray(sentencepiece_model), dtype=torch.uint8)
    save_file(state, str(path))
    return path


def padded_ids(lengths=(7, 19), width=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, : n - 1] = torch.randint(3, TINY["vocab"], (n - 1,), generator=g)
        ids[row, n - 1] = 1  # end token
        mask[row, :n] = 1
    return ids, mask


def real_positions_error(ours: torch.Tensor, reference: torch.Tensor, mask: torch.Tensor) -> float:
    keep = mask.bool()
    return relative_error(ours[keep], reference[keep])


# --- full-size layout ----------------------------------------------------------------------------


def test_wan_checkpoint_names_fill_a_full_size_umt5_encoder():
    shapes = read_tsv(FIXTURES / "t5_keys.tsv")
    assert len(shapes) == 242
    real = in_memory("models_t5_umt5-xxl-enc-bf16.pth", {k: torch.empty(s, device="meta") for k, s in shapes.items()})
    converted = DequantizedTensors(to_transformers_names(real))
    config = config_from_shapes(converted.shapes(), real.label)
    model = build_empty(lambda: build_umt5_encoder(config))
    expected = {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}
    check_tensor_names(expected, converted, "umT5-XXL text encoder")  # raises on any mismatch
    assert len(expected) == 242
    assert sum(torch.Size(s).numel() for s in expected.values()) == 5_680_910_336


def test_full_size_config_is_umt5_xxl():
    config = umt5_xxl_config()
    assert (config.vocab_size, config.d_model, config.num_layers, config.num_heads, config.d_kv, config.d_ff) == (
        256384,
        4096,
        24,
        64,
        64,
        10240,
    )
    assert config.is_gated_act and config.dense_act_fn == "gelu_new"  # tanh GELU, as Wan's
    assert config.relative_attention_num_buckets == 32 and config.relative_attention_max_distance == 128
    assert config.layer_norm_epsilon == 1e-6


# --- equality with ComfyUI's umT5 -----------------------------------------------------------------


@pytest.mark.parametrize("layout", ["wan_pth", "comfyui_file"])
def test_matches_comfyui_umt5(layout, request, comfyui, comfyui_state):
    path = request.getfixturevalue(layout)
    # ComfyUI's file is fp16; both sides get the same fp16-rounded weights.
    state = comfyui_state if layout == "wan_pth" else {k: v.half().float() for k, v in comfyui_state.items()}
    reference_model = comfyui_umt5(comfyui, state)
    ours = load_text_encoder(path, dtype=torch.float32)
    ids, mask = padded_ids()
    with torch.no_grad():
        hidden = ours(ids, mask)
    error = real_positions_error(hidden, run_comfyui(reference_model, ids, mask), mask)
    print(f"\n{layout}: umT5 hidden states vs ComfyUI, float32 relative error {error:.3e}")
    assert error <= TOLERANCE

    # The whole prompt path: our tokenizer's ids through ComfyUI's model, trimmed as Wan trims.
    prompt_ids, prompt_mask = ours.tokenizer(PROMPTS)
    reference = run_comfyui(reference_model, prompt_ids, prompt_mask)
    for row, encoded in enumerate(ours.encode(PROMPTS)):
        n = int(prompt_mask[row].sum())
        assert encoded.shape == (n, TINY["d_model"])
        error = relative_error(encoded, reference[row, :n])
        print(f"{layout}: encode() of prompt {row} ({n} tokens) vs ComfyUI, relative error {error:.3e}")
        assert error <= TOLERANCE


def test_text_encoder_inside_a_comfyui_checkpoint(tmp_path, comfyui_file):
    from safetensors.torch import load_file

    plain = load_file(str(comfyui_file))
    checkpoint = {"text_encoders.umt5xxl.transformer." + k: v for k, v in plain.items() if k != "spiece_model"}
    checkpoint["text_encoders.spiece_model"] = plain["spiece_model"]
    checkpoint["model.diffusion_model.patch_embedding.weight"] = torch.zeros(4, 4)
    checkpoint["vae.encoder.conv1.weight"] = torch.zeros(4, 4)
    path = tmp_path / "wan2.2_s2v_all_in_one.safetensors"
    save_file(checkpoint, str(path))
    expected = load_text_encoder(comfyui_file, dtype=torch.float32).encode(PROMPTS)
    for a, b in zip(load_text_encoder(path, dtype=torch.float32).encode(PROMPTS), expected):
        assert torch.equal(a, b)


def test_loads_in_bfloat16_by_default(comfyui_file):
    encoder = load_text_encoder(comfyui_file)
    assert encoder.dtype == torch.bfloat16
    assert encoder.model.encoder.embed_tokens is encoder.model.shared  # one table, not two copies
    (embedding,) = encoder.encode("a woman smiles")
    assert embedding.dtype == torch.bfloat16 and torch.isfinite(embedding).all()


# --- fp8 "scaled" files -----------------------------------------------------------------------------


def quantise(state: dict[str, torch.Tensor], scale_suffix: str):
    """ComfyUI's scaled fp8 layout: each linear weight in float8_e4m3fn with a float32 scalar
    scale (weight ~ fp8 * scale); norms, position tables and the embedding stay fp16."""
    stored, dequantised = {}, {}
    for name, value in state.items():
        module = name.removesuffix(".weight")
        if module.endswith(LINEARS):
            scale = value.abs().max().float() / 448.0
            fp8 = (value / scale).to(torch.float8_e4m3fn)
            stored[name] = fp8
            stored[module + scale_suffix] = scale.reshape(())
            dequantised[name] = fp8.float() * scale
        else:
            stored[name] = value.half()
            dequantised[name] = value.half().float()
    return stored, dequantised


@pytest.mark.parametrize("scale_suffix", [".scale_weight", ".weight_scale"])
def test_fp8_scaled_file_is_dequantised(scale_suffix, tmp_path, comfyui, comfyui_state, sentencepiece_model):
    import comfy.ops

    stored, dequantised = quantise(comfyui_state, scale_suffix)
    comfy_stored = dict(stored)
    stored["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    stored["encoder.embed_tokens.weight"] = stored["shared.weight"].clone()  # an alias some exports keep
    stored["spiece_model"] = torch.frombuffer(bytearray(sentencepiece_model), dtype=torch.uint8)
    for name in comfyui_state:  # activation scales, used only by fp8 matmuls
        if name.removesuffix(".weight").endswith(LINEARS):
            stored[name.replace(".weight", ".scale_input")] = torch.tensor(1.0)
    path = tmp_path / "umt5_xxl_fp8_e4m3fn_scaled.safetensors"
    save_file(stored, str(path))

    ours = load_text_encoder(path, dtype=torch.float32)
    q = ours.model.encoder.block[1].layer[1].DenseReluDense.wo.weight
    expected_q = dequantised["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    assert relative_error(q, expected_q) == 0.0  # fp8 * scale, exactly
    assert relative_error(q, comfyui_state["encoder.block.1.layer.1.DenseReluDense.wo.weight"]) < 0.05

    ids, mask = padded_ids()
    with torch.no_grad():
        hidden = ours(ids, mask)
    # ComfyUI itself running this format: fp8 weights, scaled at run time.
    if scale_suffix == ".scale_weight":
        fp8_ops = comfy.ops.scaled_fp8_ops(fp8_matrix_mult=False, override_dtype=torch.float8_e4m3fn)
        reference_model = comfyui_umt5(comfyui, comfy_stored, operations=fp8_ops, dtype=torch.float16)
    else:
        reference_model = comfyui_umt5(comfyui, dequantised)
    error = real_positions_error(hidden, run_comfyui(reference_model, ids, mask), mask)
    print(f"\nfp8 ({scale_suffix}): vs ComfyUI on the dequantised weights, relative error {error:.3e}")
    assert error <= TOLERANCE

    full_precision = run_comfyui(comfyui_umt5(comfyui, comfyui_state), ids, mask)
    fp8_error = real_positions_error(hidden, full_precision, mask)
    print(f"fp8 ({scale_suffix}): vs the unquantised weights, relative error {fp8_error:.3e}")
    assert fp8_error < 0.1


# --- tokenisation and encode() -----------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["wan_pth", "comfyui_file"])
def test_encode_trims_each_prompt_to_its_tokens(layout, request):
    encoder = load_text_encoder(request.getfixturevalue(layout), dtype=torch.float32)
    ids, mask = encoder.tokenizer(PROMPTS)
    assert ids.shape == mask.shape == (2, 512)
    lengths = mask.sum(dim=1).tolist()
    assert lengths[0] < lengths[1]
    for row, n in enumerate(lengths):
        assert ids[row, n - 1] == 1 and (ids[row, n:] == 0).all()  # end token, then padding

    together = encoder.encode(PROMPTS)
    assert [e.shape for e in together] == [(n, TINY["d_model"]) for n in lengths]
    for prompt, batched in zip(PROMPTS, together):
        (alone,) = encoder.encode([prompt])
        assert relative_error(batched, alone) <= TOLERANCE


def test_both_tokenizer_sources_give_the_same_ids(wan_pth, comfyui_file):
    from_folder = load_text_encoder(wan_pth, dtype=torch.float32).tokenizer
    from_file = load_text_encoder(comfyui_file, dtype=torch.float32).tokenizer
    long_prompt = " ".join(PROMPTS * 60)
    for texts in (PROMPTS, [long_prompt, "hi"]):
        for a, b in zip(from_folder(texts), from_file(texts)):
            assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["wan_pth", "comfyui_file"])
def test_long_prompts_keep_512_tokens_ending_in_the_end_token(layout, request):
    encoder = load_text_encoder(request.getfixturevalue(layout), dtype=torch.float32)
    long_prompt = " ".join(PROMPTS * 60)  # well over 512 tokens
    ids, mask = encoder.tokenizer([long_prompt, "hello"])
    assert mask[0].sum() == 512 and ids[0, -1] == 1
    embeddings = encoder.encode([long_prompt, "hello"])
    assert embeddings[0].shape == (512, TINY["d_model"])
    assert embeddings[1].shape[0] == int(mask[1].sum())


def test_prompts_are_cleaned_as_wan_cleans_them(comfyui_file):
    encoder = load_text_encoder(comfyui_file, dtype=torch.float32)
    clean, messy, escaped = encoder.encode(
        ["a man &amp; a woman smile", "  a man\t& a woman \n\n smile  ", "a man &amp;amp; a woman smile"]
    )
    assert torch.equal(clean, messy) and torch.equal(clean, escaped)


def test_unicode_is_repaired_as_wan_does_when_ftfy_is_installed():
    pytest.importorskip("ftfy")
    from liveavatar_core.text_tokenizer import clean_prompt

    assert clean_prompt("  a man’s “smile”　here ") == 'a man\'s "smile" here'


def test_padding_only_to_the_longest_prompt_gives_the_same_embeddings(comfyui_file):
    encoder = load_text_encoder(comfyui_file, dtype=torch.float32)
    official = encoder.encode(PROMPTS)
    short = encoder.encode(PROMPTS, pad_to_text_len=False)
    for a, b in zip(short, official):
        error = relative_error(a, b)
        print(f"\nunpadded vs padded to 512: relative error {error:.3e}")
        assert a.shape == b.shape and error <= TOLERANCE


def test_prompt_must_be_text(comfyui_file):
    encoder = load_text_encoder(comfyui_file, dtype=torch.float32)
    with pytest.raises(InputError, match="prompt"):
        encoder.encode([None])
    with pytest.raises(InputError, match="prompt"):
        encoder.encode([])


def test_official_layout_without_its_tokenizer_folder_says_where_it_belongs(tmp_path, comfyui_state):
    path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save(to_wan_layout(comfyui_state), path)
    with pytest.raises(CheckpointError, match=r"google/umt5-xxl") as err:
        load_text_encoder(path)
    assert str(path) in str(err.value)


def test_tokenizer_path_overrides_the_embedded_one(wan_pth, comfyui_file):
    encoder = load_text_encoder(comfyui_file, tokenizer_path=wan_pth.parent / "google" / "umt5-xxl")
    assert type(encoder.tokenizer.backend).__name__ == "T5Tokenizer"


# --- files of other networks ---------------------------------------------------------------------------


def small_copy(shapes: dict[str, tuple[int, ...]], count: int) -> dict[str, torch.Tensor]:
    return {k: torch.zeros([min(d, 4) for d in s]) for k, s in list(shapes.items())[:count]}


@pytest.mark.parametrize(
    ("tsv", "network"),
    [("vae_keys.tsv", "VAE"), ("wan22_s2v_14b_keys.tsv", "diffusion model")],
)
def test_other_networks_are_refused_with_the_fix(tsv, network, tmp_path):
    path = tmp_path / "wrong_file.safetensors"
    save_file(small_copy(read_tsv(FIXTURES / tsv), 40), str(path))
    with pytest.raises(CheckpointError) as err:
        load_text_encoder(path)
    message = str(err.value)
    print(f"\n{message}")
    assert str(path) in message and "not a umT5-XXL text encoder" in message
    assert network in message and "umt5_xxl_fp16.safetensors" in message


def test_t5_xxl_of_flux_is_refused(tmp_path, comfyui_state):
    state = {
        k: v for k, v in comfyui_state.items() if "relative_attention_bias" not in k or k.startswith("encoder.block.0.")
    }
    path = tmp_path / "t5xxl_fp16.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="not umT5-XXL"):
        load_text_encoder(path)


def test_incomplete_file_names_the_missing_tensor(tmp_path, comfyui_state, sentencepiece_model):
    state = dict(comfyui_state)
    del state["encoder.block.1.layer.1.DenseReluDense.wo.weight"]
    state["spiece_model"] = torch.frombuffer(bytearray(sentencepiece_model), dtype=torch.uint8)
    path = tmp_path / "umt5_xxl_fp16.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match=r"1 missing tensor.*block\.1\.layer\.1\.DenseReluDense\.wo"):
        load_text_encoder(path)
