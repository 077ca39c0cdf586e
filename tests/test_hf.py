"""Hugging Face folders: parity with `transformers` on tiny random models of each family, export, info, bad input.

Every model is made here with random weights; nothing is downloaded.
"""

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from conftest import ROOT, SHAKESPEARE, run_cli  # noqa: E402

from llmcli.errors import LLMError  # noqa: E402
from llmcli.formats import export_model, load_model, model_info  # noqa: E402
from llmcli.formats.ours import save_model, write_config  # noqa: E402
from llmcli.infer.generate import decode  # noqa: E402
from llmcli.infer.sampler import SamplingConfig  # noqa: E402
from llmcli.model.transformer import ModelConfig, Transformer  # noqa: E402

SENTENCEPIECE = ROOT / "llmcli" / "checkpoints" / "tinystories" / "tokenizer.model"  # 2048 tokens
SP_VOCAB = 2048

FAMILIES = {
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "gpt2-odd-heads-untied-n_inner": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=300, n_embd=36, n_layer=2, n_head=3, n_positions=64, n_inner=50, tie_word_embeddings=False)),
    "llama-gqa-untied-theta-linear-rope": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=SP_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=500.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "llama-mqa-odd-heads-biases-tied": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=SP_VOCAB, hidden_size=48, intermediate_size=40, num_hidden_layers=2, num_attention_heads=3,
        num_key_value_heads=1, max_position_embeddings=64, attention_bias=True, mlp_bias=True,
        tie_word_embeddings=True, rms_norm_eps=1e-5)),
    "llama3-rope": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=SP_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                  "high_freq_factor": 8.0, "original_max_position_embeddings": 64})),
    "mistral-gqa": lambda: transformers.MistralForCausalLM(transformers.MistralConfig(
        vocab_size=SP_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=4096)),
    "qwen2-qkv-bias": lambda: transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=SP_VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, rope_theta=1e6, tie_word_embeddings=True)),
}


@pytest.fixture(scope="module")
def byte_level_bpe(tmp_path_factory):
    """A 300-token GPT-2 style tokenizer trained here, saved both ways HF folders carry one."""
    from tokenizers.implementations import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    text = SHAKESPEARE.read_text(encoding="utf-8")[:50_000]
    tok.train_from_iterator(text.splitlines(), vocab_size=300, special_tokens=["<|endoftext|>"], show_progress=False)
    directory = tmp_path_factory.mktemp("bpe")
    tok.save_model(str(directory))  # vocab.json + merges.txt
    tok.save(str(directory / "tokenizer.json"))
    return directory


def make_hf_model(name: str):
    torch.manual_seed(0)
    model = FAMILIES[name]().eval()
    with torch.no_grad():  # HF zeroes biases and sets norms to one: randomise everything so each mapping shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def save_hf(model, directory, byte_level_bpe, tokenizer_files=("tokenizer.json",), **kwargs):
    model.save_pretrained(directory, **kwargs)
    if model.config.model_type == "gpt2":
        for name in tokenizer_files:
            shutil.copy(byte_level_bpe / name, directory)
    else:
        shutil.copy(SENTENCEPIECE, directory)
    return directory


def hf_greedy(model, prompt: list[int], steps: int) -> list[int]:
    tokens = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(steps):
            tokens = torch.cat([tokens, model(tokens).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    return tokens[0, len(prompt):].tolist()


@pytest.mark.parametrize("name", FAMILIES)
def test_logits_and_greedy_generation_equal_transformers(name, tmp_path, byte_level_bpe):
    hf_model = make_hf_model(name)
    directory = save_hf(hf_model, tmp_path / name, byte_level_bpe,
                        ("vocab.json", "merges.txt") if "odd" in name else ("tokenizer.json",))
    model, tokenizer, config = load_model(directory)
    assert model.num_params() == hf_model.num_parameters()
    tokens = torch.randint(0, hf_model.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(tokens), hf_model(tokens).logits
    assert (ours - theirs).abs().max().item() < 1e-4
    assert theirs.abs().max().item() > 0.1  # the comparison is not between near-zero numbers

    prompt = tokens[0, :8].tolist()
    greedy = SamplingConfig(max_new_tokens=32, temperature=0.0)
    (ours,) = decode(model, [prompt], greedy)
    assert ours == hf_greedy(hf_model, prompt, 32)


def test_byte_level_bpe_round_trips_and_knows_end_of_text(tmp_path, byte_level_bpe):
    from llmcli.text.tokenizer import load_tokenizer

    for files in (("tokenizer.json",), ("vocab.json", "merges.txt")):
        directory = tmp_path / files[0]
        directory.mkdir()
        for name in files:
            shutil.copy(byte_level_bpe / name, directory)
        tok = load_tokenizer(directory)
        text = "To be, or not to be: that is the question. Ünïcödé ✓"
        ids = tok.encode(text)
        assert tok.decode(ids) == text and tok.encode_batch([text, "a"])[0] == ids
        assert tok.encode("x<|endoftext|>y")[1] == tok.end_of_text == 0
        assert "".join(tok.pieces(ids)).startswith("To")


def test_sharded_checkpoint_loads_and_a_missing_shard_is_named(tmp_path, byte_level_bpe):
    hf_model = make_hf_model("llama-gqa-untied-theta-linear-rope")
    directory = save_hf(hf_model, tmp_path / "sharded", byte_level_bpe, max_shard_size="100KB")
    shards = sorted(directory.glob("model-*-of-*.safetensors"))
    assert len(shards) > 1 and (directory / "model.safetensors.index.json").is_file()
    model, _, _ = load_model(directory)
    tokens = torch.randint(0, SP_VOCAB, (1, 30))
    with torch.no_grad():
        assert (model(tokens) - hf_model(tokens).logits).abs().max().item() < 1e-4
    shards[-1].unlink()
    with pytest.raises(LLMError, match=f"names {shards[-1].name}, which is missing"):
        load_model(directory)


def train_tiny(config: ModelConfig, directory):
    """One of our checkpoints with random weights (the default layout is covered by a trained one)."""
    torch.manual_seed(3)
    model = Transformer(config).eval()
    directory.mkdir()
    save_model(directory, model)
    write_config(directory, {"model": vars(config)})
    shutil.copy(SENTENCEPIECE, directory)
    return directory


OURS = {
    "gpt2": ModelConfig(vocab_size=SP_VOCAB, context=64, n_layer=2, n_head=4, n_embd=32),  # the dataclass's own parts
    "llama": ModelConfig(vocab_size=SP_VOCAB, context=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, norm="rmsnorm",
                         positions="rope", mlp="swiglu", intermediate_size=48, bias=False, tie_embeddings=False,
                         rope_scaling=2.0),
    "qwen2": ModelConfig(vocab_size=SP_VOCAB, context=64, n_layer=2, n_head=4, n_kv_head=1, n_embd=32, norm="rmsnorm",
                         positions="rope", mlp="swiglu", bias=False, qkv_bias=True, rope_theta=1e6),
}


@pytest.mark.parametrize("kind", ["trained-default", "gpt2", "llama", "qwen2"])
def test_export_opens_in_transformers_with_the_same_logits(kind, tmp_path, nano_checkpoint):
    # a new run's default block is Llama's (rmsnorm, rope, swiglu, untied head; with biases)
    checkpoint = nano_checkpoint if kind == "trained-default" else train_tiny(OURS[kind], tmp_path / kind)
    out = export_model(checkpoint, tmp_path / "hf")
    hf_model, loading = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert all(not v for v in loading.values()), loading  # no missing, unexpected or mismatched weights
    expected_class = {"trained-default": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    assert type(hf_model).__name__ == expected_class[kind]
    model, _, _ = load_model(checkpoint)
    tokens = torch.randint(0, model.config.vocab_size, (2, model.config.context))
    with torch.no_grad():
        assert (model(tokens) - hf_model.eval()(tokens).logits).abs().max().item() < 1e-4
        assert torch.allclose(load_model(out)[0](tokens), model(tokens), atol=1e-5)  # and back again


def test_export_refuses_what_no_family_has_and_never_overwrites(tmp_path, nano_checkpoint):
    sinusoidal = ModelConfig(vocab_size=SP_VOCAB, context=32, n_layer=1, n_head=2, n_embd=32, positions="sinusoidal")
    with pytest.raises(LLMError, match="positions=sinusoidal"):
        export_model(train_tiny(sinusoidal, tmp_path / "sin"), tmp_path / "out")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(LLMError, match="not an empty directory"):
        export_model(nano_checkpoint, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_info_reads_ours_and_hf_folders(tmp_path, byte_level_bpe):
    hf_model = make_hf_model("qwen2-qkv-bias")
    directory = save_hf(hf_model, tmp_path / "qwen", byte_level_bpe)
    about = model_info(directory)
    assert about["architecture"] == "Qwen2ForCausalLM" and about["parameters"] == hf_model.num_parameters()
    assert about["context"] == 64 and about["vocab_size"] == SP_VOCAB and about["dtype"] == "F32"
    assert "grouped-query (2 key/value heads)" in about["parts"]
    assert about["size_bytes"] > 4 * hf_model.num_parameters()
    ours = model_info(None)
    assert ours["dtype"] == "BF16" and ours["architecture"] == "llmcli Transformer"


def corrupt(directory, edit_config=None, drop=None):
    if edit_config:
        config = json.loads((directory / "config.json").read_text())
        config.update(edit_config)
        (directory / "config.json").write_text(json.dumps(config))
    if drop:
        from safetensors.torch import load_file, save_file

        tensors = load_file(directory / "model.safetensors")
        del tensors[drop]
        save_file(tensors, directory / "model.safetensors")


@pytest.mark.parametrize("edit, message", [
    ({"architectures": ["BertForMaskedLM"]}, "unsupported architecture BertForMaskedLM; supported: GPT2LMHeadModel, "
                                             "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM"),
    ({"intermediate_size": 50}, r"weight model.layers.0.mlp.gate_proj.weight has shape \[48, 32\], config.json "
                                r"implies \[50, 32\]"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling of type 'yarn'"),
    ({"vocab_size": 1000}, "the tokenizer has 2048 tokens but the model's embedding only 1000"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not silu"),
])
def test_bad_hf_folders_are_refused_in_one_line(tmp_path, byte_level_bpe, edit, message):
    directory = save_hf(make_hf_model("llama-gqa-untied-theta-linear-rope"), tmp_path / "m", byte_level_bpe)
    corrupt(directory, edit_config=edit)
    with pytest.raises(LLMError, match=message):
        load_model(directory)


def test_bad_input_through_the_cli(tmp_path, byte_level_bpe):
    directory = save_hf(make_hf_model("llama-gqa-untied-theta-linear-rope"), tmp_path / "m", byte_level_bpe)
    corrupt(directory, drop="model.layers.1.self_attn.k_proj.weight")
    result = run_cli("generate", "hi", "-m", directory)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"llm: error: {directory}: weight model.layers.1.self_attn.k_proj.weight is missing\n"
    (tmp_path / "empty").mkdir()
    result = run_cli("info", tmp_path / "empty")
    assert result.returncode == 1
    assert result.stderr.strip().endswith("has no config.yaml (nor a Hugging Face config.json)")


def test_generate_eval_and_info_open_a_gpt2_folder_from_the_cli(tmp_path, byte_level_bpe, shakespeare_slice):
    from llmcli.eval.evaluate import evaluate_file

    hf_model = make_hf_model("gpt2")
    directory = save_hf(hf_model, tmp_path / "gpt2", byte_level_bpe)
    result = run_cli("generate", "ROMEO:", "-m", directory, "--max-new-tokens", "10", "--temperature", "0", "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    # (greedy tokens equal transformers' in test_logits_and_greedy_generation_equal_transformers)
    model, tok, _ = load_model(directory)
    # no start token: the folder names none (GPT2Tokenizer's add_bos_token is false), as transformers encodes it
    assert record["prompt_tokens"] == len(tok.encode("ROMEO:")) and not tok.add_bos
    assert record["new_tokens"] == 10 or record["finish_reason"] == "stop"
    small = tmp_path / "small.txt"
    small.write_text(shakespeare_slice.read_text()[:3000])
    result = run_cli("eval", small, "-m", directory, "--json")
    assert result.returncode == 0, result.stderr
    scores = json.loads(result.stdout)
    assert scores["context"] == 64
    assert scores["loss"] == pytest.approx(evaluate_file(model, tok, str(small))["loss"], rel=1e-5)
    info = run_cli("info", directory, "--json")
    assert info.returncode == 0, info.stderr
    about = json.loads(info.stdout)
    assert about["architecture"] == "GPT2LMHeadModel" and about["parameters"] == hf_model.num_parameters()
    assert about["context"] == 64 and about["vocab_size"] == 300


def test_mistral_context_stops_at_its_sliding_window(tmp_path, byte_level_bpe):
    hf_model = make_hf_model("mistral-gqa")
    hf_model.config.sliding_window = 16  # within 16 tokens, sliding-window attention is plain causal attention
    model, _, _ = load_model(save_hf(hf_model, tmp_path / "m", byte_level_bpe))
    assert model.config.context == 16
    tokens = torch.randint(0, SP_VOCAB, (2, 16))
    with torch.no_grad():
        assert (model(tokens) - hf_model(tokens).logits).abs().max().item() < 1e-4


def test_a_llama_sentencepiece_tokenizer_starts_at_bos_and_stops_at_eos(tmp_path, shakespeare_slice):
    """Llama's tokenizer.model has <s> and </s> (ids 1 and 2) and no <|endoftext|>: prompts start with <s>, and a
    sample ends at </s>."""
    import sentencepiece as spm

    from llmcli.infer.rows import encode_prompt
    from llmcli.text.tokenizer import Tokenizer

    directory = tmp_path / "llama"
    directory.mkdir()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(shakespeare_slice.read_text().splitlines()[:3000]),
                                   model_prefix=str(directory / "tokenizer"), vocab_size=400, byte_fallback=True,
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
    tokenizer = Tokenizer(directory / "tokenizer.model")
    # no <|endoftext|>: texts start with <s>, and </s> both ends a sample and separates training documents
    assert (tokenizer.end_of_text, tokenizer.start_of_text, tokenizer.stop_tokens) == (2, 1, (2,))
    assert encode_prompt(tokenizer, "ROMEO:", 64, False) == [1] + tokenizer.encode("ROMEO:")

    # a model whose every prediction is </s>: no attention or MLP output, one embedding for every token, and an
    # output head that only </s> answers
    hf_model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=400, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, tie_word_embeddings=False)).eval()
    with torch.no_grad():
        hf_model.model.embed_tokens.weight.fill_(1.0)
        for layer in hf_model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        hf_model.lm_head.weight.zero_()
        hf_model.lm_head.weight[2] = 1.0
    hf_model.save_pretrained(directory)
    result = run_cli("generate", "ROMEO:", "-m", directory, "--temperature", "0", "--json")
    assert result.returncode == 0, result.stderr
    record = json.loads(result.stdout)
    assert record["prompt_tokens"] == 1 + len(tokenizer.encode("ROMEO:"))
    assert record["finish_reason"] == "stop" and record["new_tokens"] == 0 and record["text"] == ""


def test_float32_tensors_are_mapped_copy_on_write_and_rows_read_in_place(tmp_path):
    """llmcli.files.SafetensorsFile: a float32 tensor is the file's pages (no copy), which writing to it (training)
    leaves unchanged on disk; rows of any tensor are read into a given tensor, other dtypes converted to float32."""
    from safetensors.torch import load_file, save_file

    from llmcli.files import SafetensorsFile

    tensors = {"a": torch.randn(40, 24), "b": torch.randn(7).to(torch.bfloat16), "c": torch.randn(3, 5, 2)}
    save_file(tensors, tmp_path / "t.safetensors")
    with SafetensorsFile(tmp_path / "t.safetensors") as f:
        a, b = f.tensor("a"), f.tensor("b")
        rows = torch.full((10, 24), float("nan"))
        assert f.read("a", slice(30, 40), out=rows) is rows
        assert torch.equal(f.read("c", slice(1, 3)), tensors["c"][1:3])
    assert torch.equal(a, tensors["a"]) and torch.equal(rows, tensors["a"][30:]) and b.dtype == torch.float32
    assert torch.equal(b, tensors["b"].float())
    assert a.untyped_storage().nbytes() < 40 * 24 * 4 + 4096 and not a.untyped_storage().resizable()  # the map
    a.mul_(2)
    assert torch.equal(load_file(tmp_path / "t.safetensors")["a"], tensors["a"])  # the file is as it was
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "t.safetensors").read_bytes()[:-8])
    with pytest.raises(LLMError, match=r"cut.safetensors is corrupt: tensor \w has \d+ bytes"):
        SafetensorsFile(tmp_path / "cut.safetensors")
