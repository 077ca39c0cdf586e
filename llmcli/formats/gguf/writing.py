"""Writing our models as GGUF files that llama.cpp, ollama and transformers open."""

from pathlib import Path

from llmcli.errors import LLMError
from llmcli.formats.gguf.layout import gguf_parts, llama3_factors, part_rows, permute, rotary_heads
from llmcli.formats.gguf.reading import _gguf
from llmcli.formats.gguf.tokenizer import UNUSED, tokenizer_metadata


WRITE_TYPES = ("f32", "f16", "bf16", "q8_0")


def _encode(gguf, w, type: str):
    """(array, ggml type) of a float32 tensor to store: vectors stay F32 (llama.cpp's converter does the same),
    matrices take the chosen type; Q8_0 needs rows of whole 32-value blocks, else F16."""
    import numpy as np

    Q = gguf.GGMLQuantizationType
    if w.ndim == 1 or type == "f32":
        return w, Q.F32
    if type == "q8_0" and w.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        return gguf.quants.quantize(w, Q.Q8_0), Q.Q8_0
    if type == "bf16":
        return gguf.quants.quantize(w, Q.BF16), Q.BF16
    return w.astype(np.float16), Q.F16


def _pad_vocabulary(tokens: dict, vocab_size: int):
    """Unused tokens up to the embedding's size (GGUF readers take the vocabulary's size from the tokenizer)."""
    extra = vocab_size - len(tokens["tokens"])
    if extra < 0:
        raise LLMError(f"the tokenizer has {len(tokens['tokens'])} tokens but the model only {vocab_size}")
    tokens["tokens"] += [f"[PAD{i}]" for i in range(len(tokens["tokens"]), vocab_size)]
    tokens["token_type"] += [UNUSED] * extra
    if "scores" in tokens:
        tokens["scores"] += [-1e9] * extra


def _add_tokenizer(writer, tokens: dict):
    """The tokenizer.ggml.* keys (tokenizer_metadata's) and the chat template."""
    writer.add_tokenizer_model(tokens["model"])
    writer.add_tokenizer_pre(tokens.get("pre", "default"))
    writer.add_token_list(tokens["tokens"])
    writer.add_token_types(tokens["token_type"])
    if "scores" in tokens:
        writer.add_token_scores(tokens["scores"])
    if tokens.get("merges"):
        writer.add_token_merges(tokens["merges"])
    if "add_space_prefix" in tokens:
        writer.add_add_space_prefix(tokens["add_space_prefix"])
    writer.add_add_bos_token(tokens["add_bos_token"])
    for key in ("bos_token_id", "eos_token_id", "eot_token_id", "padding_token_id"):
        if key in tokens:
            getattr(writer, {"padding_token_id": "add_pad_token_id"}.get(key, f"add_{key}"))(tokens[key])
    if "chat_template" in tokens:
        writer.add_chat_template(tokens["chat_template"])


def write_gguf(model, tokenizer, out: Path, type: str = "f16") -> Path:
    """Write a language model as one .gguf file that llama.cpp and transformers open: our default parts as GGUF's
    gpt2, Llama's parts as llama (qwen2 with q/k/v biases only), matrices in `type` (WRITE_TYPES), the tokenizer and
    its chat template in the metadata. Raises LLMError for parts no GGUF architecture has or an unknown type."""
    import os
    import tempfile

    import numpy as np
    import torch

    from llmcli.files import file_mode, make_output_dir, os_error_reason
    from llmcli.formats.hf import export_family

    gguf = _gguf()
    if type not in WRITE_TYPES:
        raise LLMError(f"unknown GGUF tensor type {type!r}; choose one of {', '.join(WRITE_TYPES)}")
    c = model.config
    arch = export_family(c)
    tokens = tokenizer_metadata(tokenizer)
    _pad_vocabulary(tokens, c.vocab_size)

    def write(tmp: Path):
        writer = gguf.GGUFWriter(tmp, arch)
        writer.add_name(out.stem)
        writer.add_context_length(c.context)
        writer.add_embedding_length(c.n_embd)
        writer.add_block_count(c.n_layer)
        writer.add_feed_forward_length(c.hidden_size)
        writer.add_head_count(c.n_head)
        writer.add_vocab_size(c.vocab_size)
        if arch == "gpt2":
            writer.add_layer_norm_eps(c.norm_eps)
        else:
            writer.add_head_count_kv(c.kv_heads)
            writer.add_layer_norm_rms_eps(c.norm_eps)
            writer.add_rope_freq_base(c.rope_theta)
            writer.add_rope_dimension_count(c.head_dim)
            if c.rope_type == "llama3":  # as llama.cpp's converter: the factors as a tensor, no scaling keys
                writer.add_tensor("rope_freqs.weight", np.array(llama3_factors(c), dtype=np.float32))
            elif c.rope_scaling != 1.0:
                writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
                writer.add_rope_scaling_factor(c.rope_scaling)
        file_types = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0"}
        writer.add_file_type(gguf.LlamaFileType[file_types[type]])
        _add_tokenizer(writer, tokens)
        state = model.state_dict()
        if arch == "gpt2" and c.tie_embeddings:  # llama.cpp's gpt2 loader needs output.weight: a copy, as its converter
            state["lm_head.weight"] = state["token_embedding.weight"]
        with torch.no_grad():
            for name, tensor in state.items():
                rows = part_rows(arch, c, name) or [tensor.size(0)]
                for gguf_name, part in zip(gguf_parts(arch, name), tensor.float().split(rows)):
                    w = np.ascontiguousarray(part.numpy())
                    if heads := rotary_heads(arch, c, gguf_name):
                        w = np.ascontiguousarray(permute(w, heads))
                    data, ggml_type = _encode(gguf, w, type)
                    writer.add_tensor(gguf_name, data, raw_dtype=ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    # written whole to a temporary file beside out, then renamed: out is never half a file
    make_output_dir(out.parent)
    try:
        fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        raise LLMError(f"could not write {out}: {os_error_reason(e)}") from None
    try:
        write(Path(tmp))
        os.chmod(tmp, file_mode())
        os.replace(tmp, out)
    except OSError as e:
        raise LLMError(f"could not write {out}: {os_error_reason(e)}") from None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out
