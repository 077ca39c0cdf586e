"""Models by Hugging Face Hub id (llmcli/formats/hub.py), found in a cache laid out by huggingface_hub's own
functions, offline: no test reaches the network (HF_HUB_OFFLINE=1 in every run)."""

import hashlib
import json

import pytest
from conftest import run_cli

from llmcli.formats import export_model


def put_in_cache(cache, repo: str, files: dict, commit: str = "0123456789abcdef0123456789abcdef01234567"):
    """repo's files (name -> path or bytes) as huggingface_hub's downloads leave them: blobs named by their hash,
    snapshot links to them, refs/main naming the commit; written with huggingface_hub's own helpers."""
    from huggingface_hub.file_download import _cache_commit_hash_for_specific_revision, _create_symlink

    storage = cache / f"models--{repo.replace('/', '--')}"
    for name, content in files.items():
        data = content if isinstance(content, bytes) else content.read_bytes()
        blob = storage / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = storage / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        _create_symlink(str(blob), str(link), new_blob=True)
    _cache_commit_hash_for_specific_revision(str(storage), "main", commit)


@pytest.fixture(scope="module")
def hub(tmp_path_factory, nano_checkpoint):
    """A Hugging Face cache holding a model folder, a repository of two GGUF files, one of pickle weights only and one
    interrupted download; and the environment that points llm at it, offline."""
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache

    root = tmp_path_factory.mktemp("hub")
    cache = root / "hub"
    folder = export_model(nano_checkpoint, root / "nano-hf", "hf")
    put_in_cache(cache, "tiny-org/nano", {f.name: f for f in folder.iterdir()})
    ggufs = {}
    for kind in ("Q8_0", "F16"):
        ggufs[f"nano-{kind}.gguf"] = export_model(nano_checkpoint, root / f"nano-{kind}.gguf", "gguf", kind.lower())
    put_in_cache(cache, "tiny-org/nano-GGUF", ggufs)
    put_in_cache(cache, "tiny-org/pickled", {"config.json": folder / "config.json", "pytorch_model.bin": b"\x80\x04"})
    put_in_cache(cache, "tiny-org/half", {f.name: f for f in folder.iterdir() if "safetensors" not in f.name})
    # huggingface_hub reads it as its own
    assert {r.repo_id for r in scan_cache_dir(cache).repos} == {"tiny-org/nano", "tiny-org/nano-GGUF",
                                                                 "tiny-org/pickled", "tiny-org/half"}
    assert try_to_load_from_cache("tiny-org/nano", "config.json", cache_dir=cache).endswith("config.json")
    env = {"HF_HUB_CACHE": str(cache), "HF_HOME": str(root / "home"), "HF_HUB_OFFLINE": "1"}
    return {"env": env, "folder": folder, "ggufs": {k: root / k for k in ggufs}}


def generate(model, env):
    return run_cli("generate", "ROMEO:", "-m", model, "--max-new-tokens", "12", "--temperature", "1", "--seed", "1",
                   env=env)


def test_a_cached_model_folder_is_taken_by_its_hub_id_offline(hub):
    by_id, by_path = generate("tiny-org/nano", hub["env"]), generate(hub["folder"], hub["env"])
    assert by_id.returncode == 0, by_id.stderr
    assert by_id.stdout == by_path.stdout and by_id.stdout.strip()


def test_a_gguf_file_is_taken_by_quantization_tag_or_file_name(hub):
    by_tag = generate("tiny-org/nano-GGUF:Q8_0", hub["env"])
    assert by_tag.returncode == 0, by_tag.stderr
    assert by_tag.stdout == generate(hub["ggufs"]["nano-Q8_0.gguf"], hub["env"]).stdout
    by_name = generate("tiny-org/nano-GGUF:nano-F16.gguf", hub["env"])
    assert by_name.returncode == 0 and by_name.stdout == generate(hub["ggufs"]["nano-F16.gguf"], hub["env"]).stdout


def one_line_error(result, *fragments):
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) == 1 and lines[0].startswith("llm: error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def test_what_cannot_be_had_offline_is_one_line(hub):
    one_line_error(generate("tiny-org/absent", hub["env"]), "not in the Hugging Face cache", "HF_HUB_OFFLINE=1")
    # an interrupted download (weights missing) is not taken for a model
    one_line_error(generate("tiny-org/half", hub["env"]), "without a usable model", "HF_HUB_OFFLINE=1")
    one_line_error(generate("tiny-org/pickled", hub["env"]), "pytorch_model.bin (pickle")
    one_line_error(generate("tiny-org/nano-GGUF:Q4_K_M", hub["env"]), "tiny-org/nano-GGUF:nano-Q8_0.gguf")


def test_llm_models_lists_the_shipped_model_llm_model_and_the_cache(hub):
    result = run_cli("models", "--json", env={**hub["env"], "LLM_MODEL": "tiny-org/nano"})
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert "shipped" in lines[0]["format"] and lines[0]["size_bytes"] > 1_000_000
    assert lines[1]["model"] == "tiny-org/nano" and "LLM_MODEL" in lines[1]["format"]
    entries = {e["model"]: e for e in lines[2:]}
    listed = {m: e["format"] for m, e in entries.items() if m.startswith("tiny-org/")}
    assert {"tiny-org/nano-GGUF:nano-Q8_0.gguf", "tiny-org/nano-GGUF:nano-F16.gguf"} <= set(listed)
    assert not {"tiny-org/pickled", "tiny-org/half"} & set(listed)  # nothing -m could not take
    gguf = entries["tiny-org/nano-GGUF:nano-Q8_0.gguf"]
    assert gguf["format"] == "GGUF" and gguf["size_bytes"] == hub["ggufs"]["nano-Q8_0.gguf"].stat().st_size
    plain = run_cli("models", env=hub["env"])
    assert plain.returncode == 0 and "tiny-org/nano\tHugging Face folder (safetensors)\t" in plain.stdout
