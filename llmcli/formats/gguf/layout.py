"""Where our Transformer's tensors and settings live in a GGUF file, shared by reading and writing.

Three differences of layout from our Transformer, as in Hugging Face folders (llmcli/formats/hf.py): Llama's and
Qwen2's q/k/v and gate/up are separate tensors, which we concatenate; llama.cpp's converter reorders the rows of
Llama's query and key weights so that rotary pairs are adjacent (Qwen2's are left as they are), which we undo on
reading and redo on writing; GPT-2's tensors are plain (out, in) matrices here, as ours.
"""

from pathlib import Path

from llmcli.errors import LLMError


ARCHITECTURES = ("llama", "qwen2", "gpt2")  # Mistral and SmolLM files say llama

# Where each of our tensors lives in a GGUF file: a block's parts (concatenated along dim 0), then the rest
BLOCK_PARTS = {
    "gpt2": {"norm_1": ["attn_norm"], "attn.qkv": ["attn_qkv"], "attn.proj": ["attn_output"], "norm_2": ["ffn_norm"],
             "mlp.fc": ["ffn_up"], "mlp.proj": ["ffn_down"]},
    "llama": {"norm_1": ["attn_norm"], "attn.qkv": ["attn_q", "attn_k", "attn_v"], "attn.proj": ["attn_output"],
              "norm_2": ["ffn_norm"], "mlp.fc": ["ffn_gate", "ffn_up"], "mlp.proj": ["ffn_down"]},
}
OUTSIDE_BLOCKS = {"token_embedding": "token_embd", "position_embedding": "position_embd", "norm_f": "output_norm",
                  "lm_head": "output"}


def architecture_of(metadata: dict, path: Path) -> str:
    architecture = metadata.get("general.architecture")
    if architecture not in ARCHITECTURES:
        raise LLMError(f"{path}: unsupported GGUF architecture {architecture!r}; supported: {', '.join(ARCHITECTURES)}")
    return architecture


def model_settings(metadata: dict, shapes: dict[str, tuple], path: Path, rope_factors=None) -> dict:
    """ModelConfig fields from the metadata, the tensors' shapes and the rope_freqs tensor's values if the file has
    one; refuses what our Transformer would not compute exactly (partial rotary, a rope scaling other than linear or
    Llama 3's, ...)."""
    arch = architecture_of(metadata, path)

    def need(key):
        if f"{arch}.{key}" not in metadata:
            raise LLMError(f"{path}: the GGUF metadata has no {arch}.{key}, which a {arch} model needs")
        return metadata[f"{arch}.{key}"]

    def refuse(reason):
        raise LLMError(f"{path}: {reason}; this {arch} model cannot be run exactly, so it is refused")

    if "token_embd.weight" not in shapes:
        raise LLMError(f"{path}: weight token_embd.weight is missing")
    vocab_size = shapes["token_embd.weight"][0]
    n_embd, n_head = need("embedding_length"), need("attention.head_count")
    settings = dict(vocab_size=vocab_size, context=need("context_length"), n_layer=need("block_count"),
                    n_head=n_head, n_embd=n_embd, intermediate_size=need("feed_forward_length"),
                    tie_embeddings="output.weight" not in shapes)
    if arch == "gpt2":
        return settings | dict(norm_eps=float(metadata.get("gpt2.attention.layer_norm_epsilon", 1e-5)))

    head_dim = n_embd // n_head
    for key in ("rope.dimension_count", "attention.key_length", "attention.value_length"):
        if metadata.get(f"{arch}.{key}", head_dim) != head_dim:
            refuse(f"{arch}.{key} is {metadata[f'{arch}.{key}']}, not the head size {head_dim}")
    scaling = metadata.get(f"{arch}.rope.scaling.type", "none")
    factor = float(metadata.get(f"{arch}.rope.scaling.factor", metadata.get(f"{arch}.rope.scale_linear", 1.0)))
    if "rope_freqs.weight" in shapes:
        llama3 = llama3_rope(rope_factors, float(metadata.get(f"{arch}.rope.freq_base", 10000.0)), head_dim)
        if llama3 is None:
            refuse("its rope_freqs tensor is not Llama 3's rope scaling")
        return model_settings({k: v for k, v in metadata.items() if "rope.scaling" not in k},
                              {k: v for k, v in shapes.items() if k != "rope_freqs.weight"}, path) | llama3
    if scaling not in ("none", "linear"):
        refuse(f"rope scaling of type {scaling!r} (only linear is supported)")
    # biases: Qwen2 has them on q/k/v only; a Llama file may have them everywhere (attention_bias and mlp_bias)
    bias = "blk.0.attn_output.bias" in shapes
    qkv_bias = "blk.0.attn_q.bias" in shapes and not bias
    return settings | dict(
        n_kv_head=metadata.get(f"{arch}.attention.head_count_kv", n_head), norm="rmsnorm", positions="rope",
        mlp="swiglu", bias=bias, qkv_bias=qkv_bias,
        norm_eps=float(metadata.get(f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(metadata.get(f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=factor if scaling == "linear" or f"{arch}.rope.scale_linear" in metadata else 1.0)


def llama3_factors(config) -> list[float]:
    """llama.cpp's rope_freqs for a Llama 3 rope: how much each rotary frequency is divided by."""
    dim = config.head_dim
    scaled, _ = config.rope_frequencies()
    return [1.0 / config.rope_theta ** (i / dim) / f for i, f in zip(range(0, dim, 2), scaled)]


def llama3_rope(factors, theta: float, head_dim: int) -> dict | None:
    """ModelConfig's Llama 3 rope fields that give these rope_freqs (convert_hf_to_gguf.py writes the factors, not
    the settings), or None if none do. The factors are 1 for short wavelengths w, `factor` for long ones, and
    1 / ((1 - s) / factor + s) between, with s = (original_context / w - low) / (high - low): linear in 1 / w, so
    two points between give the settings up to scale, fixed here by low = 1 (Meta's value), rounded to 4 decimals
    (the factors are float32); checked by recomputing."""
    import math

    from llmcli.config import ModelConfig

    if factors is None or len(factors) != head_dim // 2:
        return None
    factor = max(factors)
    between = [(i, f) for i, f in enumerate(factors) if 1 + 1e-6 < f < factor * (1 - 1e-6)]
    if factor <= 1 or len(between) < 2:
        return None
    points = [(theta ** (-2 * i / head_dim) / (2 * math.pi), (1 / f - 1 / factor) / (1 - 1 / factor))
              for i, f in (between[0], between[-1])]
    (x0, s0), (x1, s1) = points
    slope = (s1 - s0) / (x1 - x0)
    intercept = s0 - slope * x0  # = -low / (high - low)
    if intercept >= 0:
        return None
    settings = dict(rope_type="llama3", rope_scaling=round(factor, 4), rope_low_freq_factor=1.0,
                    rope_high_freq_factor=round(1.0 - 1.0 / intercept, 4), rope_original_context=round(-slope / intercept))
    config = ModelConfig(n_embd=head_dim, n_head=1, positions="rope", rope_theta=theta, **settings)
    if not all(math.isclose(a, b, rel_tol=1e-4) for a, b in zip(llama3_factors(config), factors)):
        return None
    return settings


def gguf_parts(arch: str, name: str) -> list[str]:
    """The GGUF tensor names that make up our tensor `name`, in the order they are concatenated."""
    module, param = name.rsplit(".", 1)
    if module.startswith("blocks."):
        _, i, part = module.split(".", 2)
        return [f"blk.{i}.{p}.{param}" for p in BLOCK_PARTS["gpt2" if arch == "gpt2" else "llama"][part]]
    return [f"{OUTSIDE_BLOCKS[module]}.{param}"]


def part_rows(arch: str, config, name: str) -> list[int]:
    """Rows of each GGUF part of our tensor `name` (a fused q/k/v or gate/up tensor); [] for a single part."""
    if arch == "gpt2":
        return []
    if ".attn.qkv." in name:
        return [config.n_head * config.head_dim] + [config.kv_heads * config.head_dim] * 2
    if ".mlp.fc." in name:
        return [config.hidden_size] * 2
    return []


def rotary_heads(arch: str, config, gguf_name: str) -> int:
    """How many heads llama.cpp's converter reordered the rows of in this tensor: Llama's queries and keys only."""
    if arch != "llama":
        return 0
    if ".attn_q." in gguf_name:
        return config.n_head
    if ".attn_k." in gguf_name:
        return config.kv_heads
    return 0


def permute(w, n_head: int):
    """convert_hf_to_gguf.py's permute of query/key rows (weights or biases): within each head, the rotary pairs
    (i, i + head_dim/2) of Hugging Face's and our layout become adjacent rows (2i, 2i + 1), as llama.cpp rotates."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute(w, n_head: int):
    """The inverse of permute (transformers' GGUF loader does the same)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
