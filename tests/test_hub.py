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
    lines = [line for line in result.stderr.splitlines() if line.startswith("llm: error:")]
    assert result.returncode == 1 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
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


# --- downloads, from a stand-in for the Hub on this machine ------------------------------------------------------

class FakeHub:
    """The few Hub routes huggingface_hub's downloads use (file tree, revision, resolve), served from memory on a
    local port, with a log of the requests; `cut` names files whose body breaks off halfway, as a dropped
    connection does."""

    COMMIT = "1" * 40

    def __init__(self, repos: dict, cut=()):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        self.repos, self.cut, self.log = repos, set(cut), []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self.do_GET()

            def do_GET(self):
                hub.log.append((self.command, self.path))
                code, body, headers = hub.answer(self.path.split("?")[0].strip("/").split("/"))
                self.send_response(code)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command == "GET":
                    self.wfile.write(body[:len(body) // 2] if headers.get("X-Cut") else body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def answer(self, parts):
        missing = (404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
        if parts[:2] == ["api", "models"] and len(parts) >= 5:
            files = self.repos.get("/".join(parts[2:4]))
            if files is None:
                return missing
            if parts[4] == "tree":
                body = [{"type": "file", "path": n, "size": len(d), "oid": hashlib.sha1(d).hexdigest()}
                        for n, d in files.items()]
            else:
                body = {"id": "/".join(parts[2:4]), "sha": self.COMMIT, "siblings": [{"rfilename": n} for n in files]}
            return 200, json.dumps(body).encode(), {"Content-Type": "application/json"}
        files = self.repos.get("/".join(parts[:2]))
        if files is None or len(parts) < 5 or parts[2] != "resolve":
            return missing
        name = "/".join(parts[4:])
        if name not in files:
            return 404, b"", {"X-Error-Code": "EntryNotFound"}
        headers = {"X-Repo-Commit": self.COMMIT, "ETag": f'"{hashlib.sha256(files[name]).hexdigest()}"'}
        return 200, files[name], headers | ({"X-Cut": "1"} if name in self.cut else {})

    def fetched(self) -> set[str]:
        return {path.split("/resolve/")[1].split("/", 1)[1] for method, path in self.log
                if method == "GET" and "/resolve/" in path}


@pytest.fixture
def online(tmp_path, hub):
    folder = {f.name: f.read_bytes() for f in hub["folder"].iterdir()}
    repos = {"org/nano": {**folder, "pytorch_model.bin": b"\x80\x04", "README.md": b"# nano\n",
                          "nano-Q8_0.gguf": hub["ggufs"]["nano-Q8_0.gguf"].read_bytes()},
             "org/pickled": {"config.json": folder["config.json"], "pytorch_model.bin": b"\x80\x04"}}
    fake = FakeHub(repos)
    yield fake, {"HF_ENDPOINT": fake.url, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "home")}
    fake.server.shutdown()


def test_a_model_not_cached_is_downloaded_once_and_only_the_files_it_needs(online, hub):
    fake, env = online
    result = generate("org/nano", env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == generate(hub["folder"], hub["env"]).stdout
    assert fake.fetched() == {f.name for f in hub["folder"].iterdir()}  # no pickle, README or GGUF
    fake.log.clear()
    again = generate("org/nano", {**env, "HF_HUB_OFFLINE": "1"})  # from the cache now
    assert again.returncode == 0 and again.stdout == result.stdout and not fake.log
    by_tag = generate("org/nano:Q8_0", env)
    assert by_tag.returncode == 0 and fake.fetched() == {"nano-Q8_0.gguf"}


def test_a_download_that_breaks_off_leaves_no_model(tmp_path, hub):
    folder = {f.name: f.read_bytes() for f in hub["folder"].iterdir()}
    fake = FakeHub({"org/nano": folder}, cut={"model.safetensors"})
    env = {"HF_ENDPOINT": fake.url, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HOME": str(tmp_path / "home")}
    try:
        one_line_error(generate("org/nano", env), "downloading org/nano failed")
        one_line_error(generate("org/nano", {**env, "HF_HUB_OFFLINE": "1"}), "without a usable model")
        fake.cut.clear()  # the connection holds this time: the download completes
        assert generate("org/nano", env).stdout == generate(hub["folder"], hub["env"]).stdout
    finally:
        fake.server.shutdown()


def test_a_missing_or_pickle_only_repository_is_one_line(online):
    fake, env = online
    one_line_error(generate("org/absent", env), "neither a local path nor a model on the Hugging Face Hub")
    one_line_error(generate("org/pickled", env), "pytorch_model.bin (pickle")
    assert not fake.fetched()
