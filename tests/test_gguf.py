"""GGUF files: parity with `transformers`' own GGUF loading on tiny random files written here through gguf.GGUFWriter
(llama, qwen2 and gpt2; F32, F16, Q8_0 and Q4_0 tensors; both tokenizer kinds), our exports read back by
transformers, and bad files through the CLI. Nothing is downloaded.

Tolerance: the same dequantized weights in float32 on both sides, so logits agree to 1e-4 (they differ only in the
order of floating-point sums).
"""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from conftest import ROOT, SHAKESPEARE, run_cli  # noqa: E402
from llamacpp import llama_cpp, llama_cpp_greedy, llama_cpp_tokens  # noqa: E402

from llmcli.config import ModelConfig  # noqa: E402
from llmcli.formats import export_model, load_model  # noqa: E402
from llmcli.formats.ours import save_model, write_config  # noqa: E402
from llmcli.model.transformer import Transformer  # noqa: E402
from llmcli.text.tokenizer import Tokenizer  # noqa: E402

ATOL = 1e-4
SENTENCEPIECE = ROOT / "llmcli" / "checkpoints" / "tinystories" / "tokenizer.model"  # 2048 tokens, BPE
TEXTS = ["Once upon a time, a little cat named Tom found 1234 shiny stones.",
         "  two spaces, tabs\tand\nnew lines; ünïcödé 日本 🙂 <|endoftext|> the end."]
Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def bpe_tokenizer():
    """A 300-token byte-level BPE trained here: (tokens in id order, merges, token types)."""
    from tokenizers.implementations import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    text = SHAKESPEARE.read_text(encoding="utf-8")[:50_000]
    tok.train_from_iterator(text.splitlines(), vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False)
    vocab = tok.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tok._tokenizer.to_str())["model"]["merges"]]
    types = [3 if t == "<|endoftext|>" else 1 for t in tokens]
    return {"model": "gpt2", "tokens": tokens, "merges": merges, "types": types, "bos": 0, "eos": 0}


@pytest.fixture(scope="module")
def sp_tokenizer():
    """Our shipped SentencePiece model as GGUF's "llama" tokenizer, as llama.cpp's converter writes one."""
    sp = Tokenizer(SENTENCEPIECE).sp
    n = sp.GetPieceSize()
    types = [2 if sp.IsUnknown(i) else 3 if sp.IsControl(i) else 6 if sp.IsByte(i) else 1 for i in range(n)]
    return {"model": "llama", "tokens": [sp.IdToPiece(i) for i in range(n)], "scores": [sp.GetScore(i) for i in range(n)],
            "types": types, "bos": 1, "eos": 1}


def random_tensors(arch: str, vocab: int, n_embd=32, n_layer=2, n_head=4, n_kv_head=2, ffn=64, context=64,
                   tied=True, seed=0) -> dict[str, np.ndarray]:
    """GGUF-named tensors (PyTorch's (out, in) order) of a random model of the architecture."""
    rng = np.random.default_rng(seed)
    head = n_embd // n_head

    def r(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    t = {"token_embd.weight": r(vocab, n_embd), "output_norm.weight": 1 + r(n_embd)}
    if not tied:
        t["output.weight"] = r(vocab, n_embd)
    if arch == "gpt2":
        t |= {"position_embd.weight": r(context, n_embd), "output_norm.bias": r(n_embd)}
    for i in range(n_layer):
        b = f"blk.{i}."
        t |= {b + "attn_norm.weight": 1 + r(n_embd), b + "ffn_norm.weight": 1 + r(n_embd),
              b + "attn_output.weight": r(n_embd, n_embd), b + "ffn_down.weight": r(n_embd, ffn),
              b + "ffn_up.weight": r(ffn, n_embd)}
        if arch == "gpt2":
            t |= {b + "attn_qkv.weight": r(3 * n_embd, n_embd), b + "attn_qkv.bias": r(3 * n_embd),
                  b + "attn_norm.bias": r(n_embd), b + "ffn_norm.bias": r(n_embd), b + "attn_output.bias": r(n_embd),
                  b + "ffn_up.bias": r(ffn), b + "ffn_down.bias": r(n_embd)}
        else:
            t |= {b + "attn_q.weight": r(n_embd, n_embd), b + "attn_k.weight": r(n_kv_head * head, n_embd),
                  b + "attn_v.weight": r(n_kv_head * head, n_embd), b + "ffn_gate.weight": r(ffn, n_embd)}
        if arch == "qwen2":
            t |= {b + "attn_q.bias": r(n_embd), b + "attn_k.bias": r(n_kv_head * head),
                  b + "attn_v.bias": r(n_kv_head * head)}
    return t


def write_gguf_file(path, arch: str, tokenizer: dict, qtype=Q.F32, n_embd=32, n_layer=2, n_head=4, n_kv_head=2,
                    ffn=64, context=64, tied=True, pre=None, tensors=None, vocab=None, chat_template=None,
                    eps=1e-5, rope_base=10000.0, types=None):
    """A GGUF file as llama.cpp's converter lays one out: vectors in F32, matrices in qtype (or types[name])."""
    vocab = vocab or len(tokenizer["tokens"])
    tensors = tensors or random_tensors(arch, vocab, n_embd, n_layer, n_head, n_kv_head, ffn, context, tied)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_name("tiny")
    w.add_context_length(context)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(ffn)
    w.add_head_count(n_head)
    if arch == "gpt2":
        w.add_layer_norm_eps(eps)
    else:
        w.add_head_count_kv(n_kv_head)
        w.add_layer_norm_rms_eps(eps)
        w.add_rope_freq_base(rope_base)
        w.add_rope_dimension_count(n_embd // n_head)
    w.add_tokenizer_model(tokenizer["model"])
    w.add_tokenizer_pre(pre or "default")
    w.add_token_list(tokenizer["tokens"])
    w.add_token_types(tokenizer["types"])
    if "scores" in tokenizer:
        w.add_token_scores(tokenizer["scores"])
    if "merges" in tokenizer:
        w.add_token_merges(tokenizer["merges"])
    w.add_bos_token_id(tokenizer["bos"])
    w.add_eos_token_id(tokenizer["eos"])
    if chat_template:
        w.add_chat_template(chat_template)
    for name, array in tensors.items():
        kind = (types or {}).get(name, qtype)
        if array.ndim == 1 or kind == Q.F32:
            w.add_tensor(name, array)
        elif kind == Q.F16:
            w.add_tensor(name, array.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def transformers_gguf(path):
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tok


# (architecture, tensor type, tokenizer, tokenizer.ggml.pre, extra shape): each mapping shows in at least one case;
# transformers reads a GGUF gpt2 with a 1024-position table and a 4 * width MLP only
CASES = {
    "llama-q4_0-sentencepiece-gqa-tied": ("llama", Q.Q4_0, "sp", None, {}),
    "llama-f32-bpe-llama3-split-untied": ("llama", Q.F32, "bpe", "llama-bpe", {"tied": False, "n_kv_head": 1}),
    "qwen2-q8_0-bpe-qwen2-split": ("qwen2", Q.Q8_0, "bpe", "qwen2", {"rope_base": 1e6}),
    "gpt2-f16-bpe": ("gpt2", Q.F16, "bpe", "gpt-2", {"context": 1024, "ffn": 128, "n_kv_head": 4}),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_and_tokens_equal_transformers(case, tmp_path, bpe_tokenizer, sp_tokenizer):
    arch, qtype, kind, pre, shape = CASES[case]
    tokenizer = sp_tokenizer if kind == "sp" else bpe_tokenizer
    path = write_gguf_file(tmp_path / "tiny.gguf", arch, tokenizer, qtype, pre=pre, **shape)
    ours, our_tok, config = load_model(path)
    theirs, their_tok = transformers_gguf(path)
    assert config["format"] == "gguf" and config["family"] == arch
    # the tokens llama.cpp gives (transformers' GGUF tokenizer drops SentencePiece's space before leading spaces)
    expected = llama_cpp_tokens(path, TEXTS) if llama_cpp else None
    for k, text in enumerate(TEXTS):
        if expected is not None:
            assert ([our_tok.start_of_text] if our_tok.add_bos else []) + our_tok.encode(text) == expected[k], text
        assert our_tok.decode(our_tok.encode(text)) == their_tok.decode(our_tok.encode(text))
    ids = torch.tensor([our_tok.encode(TEXTS[0])[:40]])
    with torch.no_grad():
        expected = theirs(ids).logits
        got = ours(ids)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_generate_and_info_through_the_cli(tmp_path, bpe_tokenizer):
    template = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    path = write_gguf_file(tmp_path / "tiny.gguf", "llama", bpe_tokenizer, Q.Q8_0, chat_template=template)
    result = run_cli("info", path, "--json")
    assert result.returncode == 0, result.stderr
    about = json.loads(result.stdout)
    assert about["architecture"] == "llama (GGUF)" and about["vocab_size"] == 300 and about["context"] == 64
    assert "Q8_0" in about["dtype"] and about["tokenizer"] == "byte-level BPE (300 tokens)"
    result = run_cli("generate", "-m", path, "Once", "--max-new-tokens", "5", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    _, tok, _ = load_model(path)
    assert tok.chat_template == template and tok.start_of_text is None  # llama.cpp's "default" split: no BOS
    result = run_cli("tokenize", "encode", "-t", path, input="Once upon a time\n")  # its tokenizer alone
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [str(i) for i in tok.encode("Once upon a time")]  # the line, not its end


def our_checkpoint(directory, **settings) -> Transformer:
    """One of our checkpoints with random weights, the shipped SentencePiece tokenizer, and the given parts."""
    config = ModelConfig(**(dict(vocab_size=2048, n_layer=2, n_head=4, n_embd=32, context=64) | settings))
    torch.manual_seed(0)
    model = Transformer(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    directory.mkdir()
    save_model(directory, model)
    write_config(directory, {"model": vars(config)})
    (directory / "tokenizer.model").write_bytes(SENTENCEPIECE.read_bytes())
    return model


EXPORTS = {  # our parts -> GGUF architecture; transformers reads gpt2 with 1024 positions and a 4 * width MLP only
    "llama-gqa-untied-f32": (dict(norm="rmsnorm", positions="rope", mlp="swiglu", bias=False, n_kv_head=2,
                                  intermediate_size=48, tie_embeddings=False, rope_theta=500.0), "f32", "llama"),
    "qwen2-qkv-bias-q8_0": (dict(norm="rmsnorm", positions="rope", mlp="swiglu", bias=False, qkv_bias=True,
                                 n_kv_head=2, intermediate_size=64), "q8_0", "qwen2"),
    "gpt2-default-parts-f16": (dict(context=1024), "f16", "gpt2"),
    "gpt2-bf16": (dict(context=1024), "bf16", "gpt2"),
}


@pytest.mark.parametrize("case", EXPORTS)
def test_export_reads_back_in_transformers(case, tmp_path):
    settings, type, arch = EXPORTS[case]
    original = our_checkpoint(tmp_path / "ckpt", **settings)
    out = tmp_path / "out" / "model.gguf"
    if case == next(iter(EXPORTS)):  # through the CLI once, as a user runs it; by the function otherwise (faster)
        result = run_cli("export", tmp_path / "ckpt", "--format", "gguf", "--type", type, "-o", out)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == str(out)
    else:
        assert export_model(tmp_path / "ckpt", out, "gguf", type) == out
    reader = gguf.GGUFReader(out)
    assert reader.fields["general.architecture"].contents() == arch
    matrices = {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2}
    assert matrices == {type.upper()}
    ours, tok, _ = load_model(out)
    theirs, _ = transformers_gguf(out)
    sp = Tokenizer(SENTENCEPIECE)
    for text in TEXTS:  # our SentencePiece tokenizer (no dummy prefix) survives the trip
        assert tok.encode(text) == sp.encode(text)
    ids = torch.tensor([sp.encode(TEXTS[0])[:40]])
    with torch.no_grad():
        expected, got, before = theirs(ids).logits, ours(ids), original(ids)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    if type == "f32":  # lossless: the file holds exactly our weights
        torch.testing.assert_close(got, before, atol=ATOL, rtol=0)
    else:
        assert (got - before).abs().max() < 0.2 * before.abs().max()


def test_export_refuses_an_existing_file_and_an_unknown_type(tmp_path, nano_checkpoint):
    out = tmp_path / "m.gguf"
    out.write_bytes(b"keep me")
    assert "already exists" in bad("export", nano_checkpoint, "--format", "gguf", "-o", out)
    assert out.read_bytes() == b"keep me"
    assert "q4_k" in bad("export", nano_checkpoint, "--format", "gguf", "--type", "q4_k", "-o", tmp_path / "n.gguf")


def bad(*args) -> str:
    result = run_cli(*args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llm: error: "), result.stderr
    return lines[0]


def test_bad_gguf_files_are_one_line(tmp_path, bpe_tokenizer):
    good = write_gguf_file(tmp_path / "good.gguf", "llama", bpe_tokenizer, Q.Q4_0)
    data = good.read_bytes()
    (tmp_path / "half.gguf").write_bytes(data[:len(data) // 2])  # the tensors cut short
    assert "half.gguf is truncated or corrupt" in bad("generate", "-m", tmp_path / "half.gguf", "x")
    (tmp_path / "head.gguf").write_bytes(data[:100])  # the metadata cut short
    assert "head.gguf is truncated or corrupt" in bad("info", tmp_path / "head.gguf")
    (tmp_path / "text.gguf").write_text("not a model")
    assert "text.gguf is not a GGUF file" in bad("info", tmp_path / "text.gguf")

    mamba = write_gguf_file(tmp_path / "mamba.gguf", "llama", bpe_tokenizer)
    mamba.write_bytes(mamba.read_bytes().replace(b"llama", b"mamba"))  # the architecture and its keys' prefix
    assert "unsupported GGUF architecture 'mamba'" in bad("generate", "-m", mamba, "x")

    tensors = random_tensors("llama", 300)
    tensors["blk.0.attn_q.weight"] = tensors["blk.0.attn_q.weight"].astype(np.int8)  # GGUF type I8
    odd = write_gguf_file(tmp_path / "i8.gguf", "llama", bpe_tokenizer, tensors=tensors)
    assert "blk.0.attn_q.weight has type I8" in bad("generate", "-m", odd, "x")
    raw = bytearray(write_gguf_file(tmp_path / "t99.gguf", "llama", bpe_tokenizer).read_bytes())
    name = b"blk.0.attn_q.weight"
    at = raw.index(name) + len(name) + 4 + 2 * 8  # after the name: n_dims (u32), dims (2 x u64), then the type
    raw[at:at + 4] = (99).to_bytes(4, "little")
    (tmp_path / "t99.gguf").write_bytes(bytes(raw))
    assert "unknown tensor type 99" in bad("info", tmp_path / "t99.gguf")

    tensors = random_tensors("llama", 320)  # 320 embedding rows, 300 tokens
    mismatch = write_gguf_file(tmp_path / "vocab.gguf", "llama", bpe_tokenizer, tensors=tensors, vocab=320)
    assert "the tokenizer has 300 tokens but the model's embedding 320" in bad("generate", "-m", mismatch, "x")


def test_help_imports_neither_gguf_nor_tokenizers():
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "llmcli", "--help"], capture_output=True,
                            text=True, cwd=ROOT)
    assert result.returncode == 0
    imported = {line.split("|")[-1].strip().split(".")[0] for line in result.stderr.splitlines() if "|" in line}
    assert "llmcli" in imported
    assert not imported & {"gguf", "tokenizers", "transformers", "torch"}


def test_llama3_rope_goes_out_and_back_as_rope_freqs(tmp_path):
    """llama.cpp keeps Llama 3.1's rope scaling as a rope_freqs tensor of factors, not as settings; transformers'
    GGUF loader ignores that tensor, so this is checked against our own checkpoint."""
    settings = dict(norm="rmsnorm", positions="rope", mlp="swiglu", bias=False, n_embd=64, n_head=4, context=64,
                    rope_type="llama3", rope_scaling=8.0, rope_high_freq_factor=16.0, rope_original_context=2048)
    original = our_checkpoint(tmp_path / "ckpt", **settings)
    out = export_model(tmp_path / "ckpt", tmp_path / "llama3.gguf", "gguf", "f32")
    assert "rope_freqs.weight" in {t.name for t in gguf.GGUFReader(out).tensors}
    ours, tok, config = load_model(out)
    assert {k: config["model"][k] for k in ("rope_type", "rope_scaling", "rope_low_freq_factor",
                                            "rope_high_freq_factor", "rope_original_context")} == \
        {"rope_type": "llama3", "rope_scaling": 8.0, "rope_low_freq_factor": 1.0, "rope_high_freq_factor": 16.0,
         "rope_original_context": 2048}
    ids = torch.tensor([tok.encode(TEXTS[0])[:40]])
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), original(ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["bpe", "sp"])
def test_a_gguf_model_exports_to_gguf_and_hf_unchanged(kind, tmp_path, bpe_tokenizer, sp_tokenizer):
    """A model read from GGUF (its tokenizer built from the metadata) goes out again as GGUF (byte-level BPE as
    gpt2 tokens + merges and the split it uses; SentencePiece-style as llama tokens + scores) and as a Hugging Face
    folder, with the same tokens and logits; a GGUF file without the .gguf name (an ollama blob) reads too."""
    tokenizer, pre = (bpe_tokenizer, "llama-bpe") if kind == "bpe" else (sp_tokenizer, None)
    path = write_gguf_file(tmp_path / "tiny.gguf", "llama", tokenizer, pre=pre, tied=False)
    blob = tmp_path / "sha256-0123"
    blob.write_bytes(path.read_bytes())
    original, tok, _ = load_model(blob)
    export_model(path, tmp_path / "again.gguf", "gguf", "f32")
    export_model(path, tmp_path / "hf", "hf")
    assert gguf.GGUFReader(tmp_path / "again.gguf").fields["tokenizer.ggml.pre"].contents() == (pre or "default")
    ids = torch.tensor([tok.encode(TEXTS[0])[:40]])
    for copy in (tmp_path / "again.gguf", tmp_path / "hf"):
        model, copy_tok, _ = load_model(copy)
        for text in TEXTS:
            assert copy_tok.encode(text) == tok.encode(text), (copy, text)
        with torch.no_grad():
            torch.testing.assert_close(model(ids), original(ids), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_torch_dequantizes_exactly_as_gguf_quants(kind):
    """Our torch dequantizer (fast enough to load SmolLM2-135M in about a second) gives gguf.quants' values, bit for
    bit, whole and a block of rows at a time."""
    from llmcli.formats.gguf import dequantize

    rng = np.random.default_rng(0)  # rows 1000x apart in size, and a negative offset: every term of the formula shows
    w = (rng.standard_normal((48, 96)) * 10.0 ** rng.integers(-3, 1, (48, 1)) - 0.01).astype(np.float32)
    data = gguf.quants.quantize(w, Q[kind])
    expected = gguf.quants.dequantize(data, Q[kind])
    assert np.array_equal(dequantize(gguf, data, Q[kind]).numpy(), expected)
    rows = torch.empty(16, 96)
    assert dequantize(gguf, data[8:24], Q[kind], out=rows) is rows and np.array_equal(rows.numpy(), expected[8:24])
    assert not np.array_equal(expected, w)  # (a lossy type: the comparison is not trivially of w with itself)


def int4_weights(layer) -> torch.Tensor:
    """The (out, in) weights an Int4Linear multiplies by, read back through its kernel with the identity as input
    (exact in bfloat16; the output is rounded to bfloat16)."""
    eye = torch.eye(layer.weight.size(1) * 2)
    with torch.no_grad():
        return (layer(eye) - (0 if layer.bias is None else layer.bias)).T


@pytest.mark.parametrize("qtype", [Q.Q4_1, Q.Q4_0])
def test_q4_matrices_go_into_the_int4_kernel_as_they_are(qtype, tmp_path, monkeypatch, sp_tokenizer):
    """--quantize int4 takes a Q4_0/Q4_1 file's blocks as its groups (scale d; zero m + 8d, or 0): each layer is
    the file's dequantized weights (the float32 model's) within the bfloat16 rounding of the scales and zeros and of
    the kernel's output, across the fused q/k/v (llama.cpp's reordered query and key rows put back) and gate/up
    matrices read in blocks of 64 rows; no matrix is quantized from float32. Against the old way (quantizing the float32
    model): the same model from Q4_1, a closer one from Q4_0."""
    from llmcli.model import quantize as quantize_module
    from llmcli.model.quantize import Int4Linear, quantize

    path = write_gguf_file(tmp_path / "tiny.gguf", "llama", sp_tokenizer, qtype, n_embd=64, ffn=128, tied=False)
    reference = load_model(path)[0]
    before = quantize(load_model(path)[0], "int4")
    monkeypatch.setattr(quantize_module, "BLOCK_VALUES", 64 * 64)  # q, then k and v together; gate/up in 4 blocks

    def requantized(weight):
        raise AssertionError("a Q4 matrix was dequantized and quantized again")

    monkeypatch.setattr(quantize_module, "int4_groups", requantized)
    model = load_model(path, quantize="int4")[0]
    layers = {name: m for name, m in model.named_modules() if isinstance(m, Int4Linear)}
    assert len(layers) == 2 * 4  # qkv, proj, fc, mlp.proj of both blocks (the output head is int8)
    for name, layer in layers.items():
        expected = reference.get_submodule(name).weight.detach()
        groups = expected.reshape(-1, 32)
        # bf16 keeps 8 significant bits: the scale (times |q - 8| <= 8), the zero and the output each err by at
        # most 2^-8 of themselves; 8 * scale <= 16/15 of the group's largest |w|, the zero and the output <= it
        bound = 2 ** -8 * (16 / 15 + 2) * groups.abs().amax(1, keepdim=True)
        error = (int4_weights(layer) - expected).reshape(-1, 32).abs()
        assert (error <= bound).all(), name
        assert error.amax() > 0  # (bfloat16 rounded something: the comparison is not of a copy with itself)
    ids = torch.randint(0, 2048, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours, old, exact = model(ids), before(ids), reference(ids)
    if qtype == Q.Q4_1:  # quantizing Q4_1's values found the file's own groups again (min = m, (max - min) / 15 = d)
        assert torch.equal(ours, old)
    else:  # Q4_0's values -8d..7d rarely reach 7d, and quantizing them fitted groups of their own: a second rounding
        assert relative_error(ours, exact) < relative_error(old, exact) / 5  # (here 0.03 against 0.30)


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).norm() / reference.norm()).item()


def test_a_fused_matrix_not_all_q4_goes_the_float32_way(tmp_path, sp_tokenizer):
    """A Q8_0 or F16 part in a fused matrix (or Q4_0 beside Q4_1) sends that matrix through float32 and int4's own
    groups, as any other type: the same layer as quantizing the float32 model."""
    from llmcli.model.quantize import quantize

    types = {"blk.0.attn_k.weight": Q.Q8_0, "blk.1.ffn_up.weight": Q.F16, "blk.1.attn_q.weight": Q.Q4_0}
    path = write_gguf_file(tmp_path / "mixed.gguf", "llama", sp_tokenizer, Q.Q4_1, n_embd=64, ffn=128, types=types)
    model = load_model(path, quantize="int4")[0]
    expected = quantize(load_model(path)[0], "int4")
    for name in ("blocks.0.attn.qkv", "blocks.1.mlp.fc", "blocks.1.attn.qkv"):
        assert torch.equal(model.get_submodule(name).weight, expected.get_submodule(name).weight), name
        assert torch.equal(model.get_submodule(name).scales_and_zeros, expected.get_submodule(name).scales_and_zeros)


def test_arrays_of_strings_read_back_as_written(tmp_path, bpe_tokenizer):
    """open_gguf decodes an array of strings in one piece, with a zero byte put between the strings and split at:
    empty and non-ASCII strings, and strings that hold a zero byte themselves (decoded one by one then), read back
    as `gguf` reads them; an array cut short or not UTF-8 is one line."""
    from llmcli.formats.gguf import open_gguf, read_metadata

    path = tmp_path / "strings.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_array("test.plain", ["", "a", "ünïcödé", "日本 🙂", "x" * 300, ""])
    writer.add_array("test.zero", ["a\x00b", "", "c\x00"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    metadata = read_metadata(open_gguf(path), path)
    assert metadata["test.plain"] == ["", "a", "ünïcödé", "日本 🙂", "x" * 300, ""]
    assert metadata["test.zero"] == ["a\x00b", "", "c\x00"]
    assert metadata["general.architecture"] == "llama"

    data = write_gguf_file(tmp_path / "good.gguf", "llama", bpe_tokenizer).read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:data.index(b"<|endoftext|>") + 5])  # inside the token list
    assert "cut.gguf is truncated or corrupt" in bad("info", tmp_path / "cut.gguf")
    (tmp_path / "latin1.gguf").write_bytes(data.replace(b"<|endoftext|>", b"<|endoftext\xff>"))
    assert "latin1.gguf is truncated or corrupt" in bad("info", tmp_path / "latin1.gguf")


def test_the_reader_override_reads_every_field_as_the_pinned_gguf_does(tmp_path, bpe_tokenizer, sp_tokenizer):
    """open_gguf's reader overrides private methods of gguf.GGUFReader, so pyproject.toml pins the gguf version
    tested here: every field of both tokenizer kinds' files reads back as the plain reader's contents()."""
    import re
    from importlib.metadata import version

    from llmcli.formats.gguf import open_gguf, read_metadata

    pin = re.search(r'"gguf==([\d.]+)"', (ROOT / "pyproject.toml").read_text()).group(1)
    assert version("gguf") == pin
    for name, tokenizer in (("bpe", bpe_tokenizer), ("sp", sp_tokenizer)):
        path = write_gguf_file(tmp_path / f"{name}.gguf", "llama", tokenizer)
        plain = gguf.GGUFReader(path)
        ours = read_metadata(open_gguf(path), path)
        assert ours.keys() == plain.fields.keys()
        for key, field in plain.fields.items():
            assert ours[key] == field.contents(), key
        assert [t.name for t in open_gguf(path).tensors] == [t.name for t in plain.tensors]


@pytest.mark.skipif(not llama_cpp, reason="llama.cpp's text needs the xllamacpp wheel (pip install 'llmcli[test]')")
def test_our_export_runs_in_llama_cpp_with_our_tokens_and_greedy_text(tmp_path):
    """The shipped model (GPT-2's parts, tied: output.weight written as llama.cpp's loader wants) exported to GGUF:
    llama.cpp reads the same prompt tokens (its <|endoftext|> start, stated in the file) and continues greedily with
    the text `llm generate --temperature 0` gives."""
    path = tmp_path / "t.gguf"
    assert run_cli("export", ROOT / "llmcli" / "checkpoints" / "tinystories", "--format", "gguf", "--type", "f32",
                   "-o", path).returncode == 0
    result = run_cli("generate", "Once upon a time", "-m", path, "--temperature", "0", "--max-new-tokens", "24",
                     "--json")
    assert result.returncode == 0, result.stderr
    ours = json.loads(result.stdout)
    theirs = llama_cpp_greedy(path, "Once upon a time", 24)
    assert (ours["prompt_tokens"], ours["text"]) == (theirs["prompt_tokens"], theirs["text"])
    assert gguf.GGUFReader(path).fields["tokenizer.ggml.add_bos_token"].contents() is True
