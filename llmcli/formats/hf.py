"""Hugging Face model folders: open GPT-2, Llama, Mistral and Qwen2 checkpoints, and write ours in that layout.

A folder holds config.json, the weights (model.safetensors, or shards named by model.safetensors.index.json) and a
tokenizer. Our Transformer has the same parts under other names, with two differences of layout: we compute
queries, keys and values in one matmul (HF: q_proj, k_proj, v_proj) and SwiGLU's gate and up projections in one
(HF: gate_proj, up_proj), so those tensors are concatenated on loading and split on export; and GPT-2's HF weights
are Conv1D layers, which store a linear layer's weight transposed.
"""

import json
from contextlib import ExitStack
from functools import partial
from pathlib import Path

from llmcli.errors import LLMError

HF_CONFIG = "config.json"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
ARCHITECTURES = {"GPT2LMHeadModel": "gpt2", "LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral",
                 "Qwen2ForCausalLM": "qwen2"}

# Where each of our tensors lives in a HF checkpoint: a block's parts (several HF tensors are concatenated along
# dim 0), and the tensors outside the blocks.
BLOCK_PARTS = {
    "gpt2": {"norm_1": ["ln_1"], "attn.qkv": ["attn.c_attn"], "attn.proj": ["attn.c_proj"], "norm_2": ["ln_2"],
             "mlp.fc": ["mlp.c_fc"], "mlp.proj": ["mlp.c_proj"]},
    "llama": {"norm_1": ["input_layernorm"], "attn.qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
              "attn.proj": ["self_attn.o_proj"], "norm_2": ["post_attention_layernorm"],
              "mlp.fc": ["mlp.gate_proj", "mlp.up_proj"], "mlp.proj": ["mlp.down_proj"]},
}
BLOCK_PREFIX = {"gpt2": "transformer.h", "llama": "model.layers"}
OUTSIDE_BLOCKS = {
    "gpt2": {"token_embedding": "transformer.wte", "position_embedding": "transformer.wpe",
             "norm_f": "transformer.ln_f", "lm_head": "lm_head"},
    "llama": {"token_embedding": "model.embed_tokens", "norm_f": "model.norm", "lm_head": "lm_head"},
}
# Tensors some HF files carry that are not weights: GPT-2's causal-mask buffers, old rotary frequency buffers
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias", "rotary_emb.inv_freq")


def is_hf_folder(directory: Path) -> bool:
    return (directory / HF_CONFIG).is_file() and not (directory / "config.yaml").is_file()


def layout(family: str) -> str:
    """Mistral and Qwen2 store their weights under Llama's names."""
    return "gpt2" if family == "gpt2" else "llama"


def read_hf_config(directory: Path) -> dict:
    path = directory / HF_CONFIG
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LLMError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise LLMError(f"{path} is not a Hugging Face model config")
    return config


def hf_family(hf: dict, where: Path) -> str:
    architectures = hf.get("architectures") or []
    for architecture in architectures:
        if architecture in ARCHITECTURES:
            return ARCHITECTURES[architecture]
    if not architectures and hf.get("model_type") in ARCHITECTURES.values():
        return hf["model_type"]
    found = ", ".join(architectures) or f"model_type {hf.get('model_type')!r}"
    raise LLMError(f"{where}: unsupported architecture {found}; supported: {', '.join(ARCHITECTURES)}")


def model_settings_from_hf(hf: dict, where: Path) -> tuple[str, dict]:
    """(family, ModelConfig fields) for a HF config.json, refusing what our Transformer would not compute exactly."""
    family = hf_family(hf, where)

    def need(key):
        if key not in hf:
            raise LLMError(f"{where / HF_CONFIG} has no '{key}', which a {family} model needs")
        return hf[key]

    def refuse(reason):
        raise LLMError(f"{where}: {reason}; this {family} model cannot be run exactly, so it is refused")

    if family == "gpt2":
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            refuse(f"activation_function {hf['activation_function']!r} is not the tanh GELU")
        if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
            refuse("the attention scaling differs from 1/sqrt(head size)")
        return family, dict(
            vocab_size=need("vocab_size"), context=need("n_positions"), n_layer=need("n_layer"),
            n_head=need("n_head"), n_embd=need("n_embd"), intermediate_size=hf.get("n_inner") or 0,
            norm_eps=hf.get("layer_norm_epsilon", 1e-5), tie_embeddings=hf.get("tie_word_embeddings", True))

    n_embd, n_head = need("hidden_size"), need("num_attention_heads")
    if hf.get("head_dim") not in (None, n_embd // n_head):
        refuse(f"head_dim {hf['head_dim']} is not hidden_size / num_attention_heads")
    if hf.get("hidden_act", "silu") != "silu":
        refuse(f"hidden_act {hf['hidden_act']!r} is not silu")
    # transformers 5 writes rope_parameters; earlier versions rope_theta and rope_scaling
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", "llama3"):
        refuse(f"rope scaling of type {rope_type!r} (default, linear and llama3 are supported)")
    rope_theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    if family == "qwen2":
        bias, qkv_bias = False, True
    else:
        attention_bias, mlp_bias = hf.get("attention_bias", False), hf.get("mlp_bias", False)
        if attention_bias != mlp_bias:
            refuse("attention_bias and mlp_bias differ")
        bias, qkv_bias = attention_bias, False
    context = need("max_position_embeddings")
    window = hf.get("sliding_window") if family == "mistral" or hf.get("use_sliding_window") else None
    if window is not None:
        # within a window's length, sliding-window attention is plain causal attention: use that much context
        context = min(context, window)
    return family, dict(
        vocab_size=need("vocab_size"), context=context, n_layer=need("num_hidden_layers"), n_head=n_head,
        n_embd=n_embd, n_kv_head=hf.get("num_key_value_heads") or n_head, intermediate_size=need("intermediate_size"),
        norm="rmsnorm", positions="rope", mlp="swiglu", bias=bias, qkv_bias=qkv_bias,
        norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False),
        rope_theta=float(rope_theta), **rope_settings(rope_type, rope))


def rope_settings(rope_type: str, rope: dict) -> dict:
    """ModelConfig's rope fields from HF's rope_scaling / rope_parameters of that type."""
    if rope_type == "linear":
        return {"rope_scaling": float(rope.get("factor", 1.0))}
    if rope_type == "llama3":
        return {"rope_type": "llama3", "rope_scaling": float(rope["factor"]),
                "rope_low_freq_factor": float(rope.get("low_freq_factor", 1.0)),
                "rope_high_freq_factor": float(rope.get("high_freq_factor", 4.0)),
                "rope_original_context": int(rope.get("original_max_position_embeddings", 8192))}
    return {}


def hf_parts(family: str, name: str) -> list[str]:
    """The HF tensor names that make up our tensor `name`, in the order they are concatenated."""
    family = layout(family)
    module, param = name.rsplit(".", 1)
    if module.startswith("blocks."):
        _, i, part = module.split(".", 2)
        return [f"{BLOCK_PREFIX[family]}.{i}.{p}.{param}" for p in BLOCK_PARTS[family][part]]
    return [f"{OUTSIDE_BLOCKS[family][module]}.{param}"]


def part_rows(family: str, config, name: str) -> list[int]:
    """Rows of each HF part of our tensor `name` (the split of a fused q/k/v or gate/up tensor); [] for one part."""
    if layout(family) == "gpt2":
        return []
    if ".attn.qkv." in name:
        return [config.n_head * config.head_dim] + [config.kv_heads * config.head_dim] * 2
    if ".mlp.fc." in name and config.mlp == "swiglu":
        return [config.hidden_size] * 2
    return []


def is_conv1d(family: str, name: str, ndim: int) -> bool:
    """GPT-2's HF linear layers are Conv1D, whose weight is (in, out): the transpose of ours."""
    return family == "gpt2" and name.startswith("blocks.") and ndim == 2


def part_shapes(family: str, config, name: str, shape: tuple) -> list[tuple]:
    rows = part_rows(family, config, name) or [shape[0]]
    shapes = [(r, *shape[1:]) for r in rows]
    return [s[::-1] for s in shapes] if is_conv1d(family, name, len(shape)) else shapes


def weight_files(directory: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it, from the single file or the sharded index."""
    from llmcli.formats.ours import safetensors_header

    index_path = directory / HF_INDEX
    if index_path.is_file():
        try:
            weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
            raise LLMError(f"{index_path} is corrupt: expected JSON with a 'weight_map'") from None
        for file in sorted(set(weight_map.values())):
            if not (directory / file).is_file():
                raise LLMError(f"{index_path} names {file}, which is missing from {directory}")
        return {name: directory / file for name, file in weight_map.items()}
    path = directory / HF_WEIGHTS
    if not path.is_file():
        raise LLMError(f"{directory} has no weights: expected {HF_WEIGHTS} or {HF_INDEX} with its shards "
                       "(only safetensors are read, never pickle .bin files)")
    return {name: path for name in safetensors_header(path)}


def load_hf_folder(directory: Path, device: str = "cpu", quantize: str | None = None):
    """(model in eval mode, tokenizer, config dict) from a Hugging Face model folder; quantize as load_model's.

    A float32 tensor our model keeps as it is becomes its parameter as a view of the file's pages; the parts of a
    fused q/k/v or gate/up matrix are read straight into its rows; with quantize, a block of rows at a time
    (llmcli/files.py's SafetensorsFile, llmcli/model/quantize.py's materialize)."""
    from llmcli.files import SafetensorsFile
    from llmcli.model.quantize import materialize
    from llmcli.model.transformer import ModelConfig, Transformer, meta_device
    from llmcli.text.tokenizer import load_tokenizer

    hf = read_hf_config(directory)
    family, settings = model_settings_from_hf(hf, directory)
    try:
        model_config = ModelConfig(**settings)
    except ValueError as e:
        raise LLMError(f"{directory / HF_CONFIG}: {e}") from None
    tokenizer = load_tokenizer(directory)
    if tokenizer.vocab_size > model_config.vocab_size:
        raise LLMError(f"{directory}: the tokenizer has {tokenizer.vocab_size} tokens but the model's embedding only "
                       f"{model_config.vocab_size}; they do not belong together")
    files = weight_files(directory)
    if family == "gpt2":  # the original GPT-2 files name their tensors without the "transformer." prefix
        files = {(n if n.startswith(("transformer.", "lm_head.")) else f"transformer.{n}"): p for n, p in files.items()}

    with meta_device():
        model = Transformer(model_config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    with ExitStack() as stack:
        opened = {p: stack.enter_context(SafetensorsFile(p)) for p in sorted(set(files.values()))}
        # name -> (the file, the name it has there: an original GPT-2 file's has no "transformer.")
        stored = {n: (opened[p], n if n in opened[p].header else n.removeprefix("transformer."))
                  for n, p in files.items()}
        _check_weights(directory, family, model_config, expected, stored)

        def read(name: str, rows: slice | None = None, out=None):
            parts = [stored[hf_name] for hf_name in hf_parts(family, name)]
            if is_conv1d(family, name, len(expected[name])):  # (small matrices: read whole, transposed)
                file, stored_name = parts[0]
                w = file.read(stored_name).t()[rows or slice(None)]
                return w.contiguous() if out is None else out.copy_(w)
            if len(parts) == 1:
                file, stored_name = parts[0]
                return file.tensor(stored_name) if rows is None and out is None else file.read(stored_name, rows, out)
            return read_parts([(file.shape(n)[0], partial(file.read, n)) for file, n in parts], expected[name], rows,
                              out)

        model = materialize(model, read, quantize)
    config = {"format": "huggingface", "family": family, "architecture": (hf.get("architectures") or [family])[0],
              "model": settings}
    return model.to(device), tokenizer, config


def read_parts(parts: list, shape: tuple, rows: slice | None = None, out=None):
    """Rows `rows` (all when None) of a tensor of `shape` made of parts stacked along dim 0, as float32, into `out`
    when given: parts are (their rows, read(rows, out=...)), each read straight into its place."""
    import torch

    start, stop, _ = (rows or slice(None)).indices(shape[0])
    out = torch.empty((stop - start, *shape[1:])) if out is None else out
    for i, part, place in split_rows([n for n, _ in parts], rows):
        parts[i][1](part, out=out[place])
    return out


def split_rows(sizes: list[int], rows: slice | None = None) -> list[tuple[int, slice, slice]]:
    """Where rows `rows` (all when None) of parts of `sizes` rows stacked along dim 0 lie: (part, its rows, their
    place among the rows asked for) for each part they touch."""
    start, stop, _ = (rows or slice(None)).indices(sum(sizes))
    pieces, first = [], 0  # the part's first row in the whole tensor
    for i, n in enumerate(sizes):
        begin, end = max(start, first), min(stop, first + n)
        if begin < end:
            pieces.append((i, slice(begin - first, end - first), slice(begin - start, end - start)))
        first += n
    return pieces


def _check_weights(directory, family, config, expected: dict, stored: dict):
    """Every tensor present with the shape config.json implies, and no weights we would silently drop."""
    used = set()
    for name, shape in expected.items():
        for hf_name, part_shape in zip(hf_parts(family, name), part_shapes(family, config, name, shape)):
            if hf_name not in stored:
                raise LLMError(f"{directory}: weight {hf_name} is missing")
            file, stored_name = stored[hf_name]
            found = file.shape(stored_name)
            if found != part_shape:
                raise LLMError(f"{directory}: weight {hf_name} has shape {list(found)}, {HF_CONFIG} implies "
                               f"{list(part_shape)}")
            used.add(hf_name)
    tied_head = "lm_head.weight" if config.tie_embeddings else None
    unexpected = sorted(n for n in stored if n not in used and n != tied_head and not n.endswith(IGNORED_SUFFIXES))
    if unexpected:
        raise LLMError(f"{directory}: {len(unexpected)} weights that {HF_CONFIG} does not account for "
                       f"(first: {unexpected[0]})")


def export_family(config) -> str:
    """The HF family whose layout is our config: GPT-2 for the default parts, Llama or Qwen2 for Llama's."""
    if (config.norm, config.positions, config.mlp) == ("layernorm", "learned", "gelu"):
        if config.bias and config.kv_heads == config.n_head:
            return "gpt2"
    elif (config.norm, config.positions, config.mlp) == ("rmsnorm", "rope", "swiglu"):
        return "qwen2" if config.qkv_bias and not config.bias else "llama"
    raise LLMError("only GPT-2's parts (layernorm, learned positions, gelu, biases, multi-head attention) or Llama's "
                   f"(rmsnorm, rope, swiglu) can be exported; this model has norm={config.norm}, "
                   f"positions={config.positions}, mlp={config.mlp}, bias={config.bias}")


def hf_config_for(family: str, config, tokenizer=None) -> dict:
    """config.json of `family` for our config; the special token ids from `tokenizer` (none without one)."""
    tokens = {"bos_token_id": None, "eos_token_id": None}
    if tokenizer is not None:
        eos = list(tokenizer.stop_tokens)
        tokens = {"bos_token_id": tokenizer.start_of_text if tokenizer.add_bos else tokenizer.bos_id,
                  "eos_token_id": eos[0] if len(eos) == 1 else eos or None}
    if family == "gpt2":
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
                "n_positions": config.context, "n_embd": config.n_embd, "n_layer": config.n_layer,
                "n_head": config.n_head, "n_inner": config.hidden_size, "activation_function": "gelu_new",
                "layer_norm_epsilon": config.norm_eps, "tie_word_embeddings": config.tie_embeddings,
                "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
                "torch_dtype": "float32", **tokens}
    architecture = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[family]
    hf = {"architectures": [architecture], "model_type": family, "vocab_size": config.vocab_size,
          "max_position_embeddings": config.context, "hidden_size": config.n_embd,
          "intermediate_size": config.hidden_size, "num_hidden_layers": config.n_layer,
          "num_attention_heads": config.n_head, "num_key_value_heads": config.kv_heads, "hidden_act": "silu",
          "rms_norm_eps": config.norm_eps, "rope_theta": config.rope_theta,
          "tie_word_embeddings": config.tie_embeddings, "attention_dropout": config.dropout,
          "torch_dtype": "float32", **tokens}
    if family == "llama":
        hf |= {"attention_bias": config.bias, "mlp_bias": config.bias}
    if config.rope_type == "llama3":
        hf["rope_scaling"] = {"rope_type": "llama3", "factor": config.rope_scaling,
                              "low_freq_factor": config.rope_low_freq_factor,
                              "high_freq_factor": config.rope_high_freq_factor,
                              "original_max_position_embeddings": config.rope_original_context}
    elif config.rope_scaling != 1.0:
        hf["rope_scaling"] = {"rope_type": "linear", "type": "linear", "factor": config.rope_scaling}
    return hf


def hf_tensors(model, family: str) -> dict:
    """Our model's weights under the names and layouts of the family's HF model (fused q/k/v split, Conv1D
    transposed)."""
    tensors = {}
    for name, tensor in model.state_dict().items():
        rows = part_rows(family, model.config, name) or [tensor.size(0)]
        for hf_name, part in zip(hf_parts(family, name), tensor.split(rows)):
            tensors[hf_name] = (part.t() if is_conv1d(family, name, tensor.ndim) else part).contiguous()
    return tensors


def write_hf(model, tokenizer, out_dir: Path) -> Path:
    """Write a language model as a HF folder that transformers' AutoModelForCausalLM.from_pretrained opens as is:
    config.json, generation_config.json (the end tokens), model.safetensors, the tokenizer's files and its chat
    template (tokenizer_config.json). Raises LLMError for parts no HF family has."""
    from safetensors.torch import save

    from llmcli.files import atomic_write, make_output_dir

    config = model.config
    family = export_family(config)
    tensors = hf_tensors(model, family)
    make_output_dir(out_dir)
    atomic_write(out_dir / HF_WEIGHTS, save(tensors, metadata={"format": "pt"}))
    hf = hf_config_for(family, config, tokenizer)
    tokens = {k: hf[k] for k in ("bos_token_id", "eos_token_id")}
    # PreTrainedTokenizerFast reads tokenizer.json as it is: the class that encodes as we do, whatever the model
    tokenizer_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": tokenizer.token(hf["bos_token_id"]),
                        "eos_token": tokenizer.token(tokenizer.stop_tokens[0] if tokenizer.stop_tokens else None),
                        "add_bos_token": tokenizer.add_bos, "add_eos_token": False,
                        "clean_up_tokenization_spaces": False}
    if tokenizer.chat_template:
        tokenizer_config["chat_template"] = tokenizer.chat_template
    for name, record in ((HF_CONFIG, hf), ("generation_config.json", tokens), ("tokenizer_config.json",
                                                                              tokenizer_config)):
        atomic_write(out_dir / name, json.dumps(record, indent=2, ensure_ascii=False) + "\n")
    tokenizer.save(out_dir)
    atomic_write(out_dir / "tokenizer.json", tokenizers_form(tokenizer).to_str())
    return out_dir


def tokenizers_form(tokenizer):
    """Our tokenizer as a `tokenizers` Tokenizer (what tokenizer.json holds), its post-processor putting the start
    token first where the model has one. A SentencePiece model is built as llama.cpp reads it from GGUF (BPE merges
    from the scores, byte fallback; llmcli/formats/gguf/tokenizer.py), a Unigram one as a Unigram model."""
    from tokenizers import Tokenizer, processors

    from llmcli.formats.gguf.tokenizer import build_tokenizer, tokenizer_metadata

    if hasattr(tokenizer, "tok"):
        tok = Tokenizer.from_str(tokenizer.tok.to_str())
    else:
        metadata = {f"tokenizer.ggml.{k}": v for k, v in tokenizer_metadata(tokenizer).items()}
        tok = build_tokenizer(metadata, tokenizer.path)
        if _sentencepiece_type(tokenizer.sp.serialized_model_proto()) == 1:  # Unigram: its own model
            from tokenizers.models import Unigram

            sp = tokenizer.sp
            tok.model = Unigram([(sp.IdToPiece(i), sp.GetScore(i)) for i in range(sp.GetPieceSize())],
                                unk_id=sp.unk_id(), byte_fallback=True)
    if tokenizer.add_bos:
        start = tokenizer.token(tokenizer.start_of_text)
        tok.post_processor = processors.TemplateProcessing(single=f"{start} $A", pair=f"{start} $A $B",
                                                           special_tokens=[(start, tokenizer.start_of_text)])
    elif tok.post_processor is not None and tok.encode("a").ids != tok.encode("a", add_special_tokens=False).ids:
        tok.post_processor = None
    return tok


def _sentencepiece_type(proto: bytes) -> int:
    """The model_type of a serialized SentencePiece ModelProto's trainer_spec (field 2, its field 3): 1 Unigram (the
    default), 2 BPE, 3 word, 4 char."""
    from llmcli.formats.gguf.tokenizer import proto_fields

    spec = next((v for f, v in proto_fields(proto) if f == 2), b"")
    return next((v for f, v in proto_fields(spec) if f == 3), 1)


def hf_info(directory: Path) -> tuple[dict, str, set[Path]]:
    """(ModelConfig fields, architecture name, weight files) of a HF folder, from config.json and the index."""
    hf = read_hf_config(directory)
    family, settings = model_settings_from_hf(hf, directory)
    return settings, (hf.get("architectures") or [family])[0], set(weight_files(directory).values())
