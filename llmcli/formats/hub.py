"""Models by Hugging Face Hub id, found and fetched with `huggingface_hub` (huggingface.co/docs/huggingface_hub).

`ORG/NAME` is a model folder: config.json, the tokenizer's files and the safetensors weights. `ORG/NAME:FILE.gguf`
is one GGUF file of the repository, and `ORG/NAME:TAG` the one whose name ends in the quantization TAG (Q4_K_M, Q8_0,
...), as llama.cpp's `-hf` takes them. The local cache comes first ($HF_HUB_CACHE, else $HF_HOME/hub, else
~/.cache/huggingface/hub, where `transformers` keeps its downloads), so a model a user already has works offline;
otherwise only the files needed are downloaded, with progress bars when stderr is a terminal. huggingface_hub writes
each file as an `.incomplete` blob and links it into the snapshot only when whole, and a snapshot is used here only
when every file the model needs is in it: an interrupted download is never taken for a whole model (the next run
resumes it).
"""

import json
import re
import sys
from pathlib import Path

from llmcli.errors import LLMError

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(?::[\w.-]+)?")
CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
WEIGHTS = "model.safetensors"
SHARD = re.compile(r"model-\d+-of-\d+\.safetensors")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "generation_config.json", "chat_template.jinja", "chat_template.json",
                   "special_tokens.json")  # the last: llm export's own, read before the others when present
DEFAULT_QUANT = "Q4_K_M"  # what llama.cpp's -hf takes from a repository of GGUF files when no tag is given


def is_hub_id(text) -> bool:
    """Whether text reads as ORG/NAME[:FILE-OR-TAG] (a path that exists is taken as the path before this is asked)."""
    return HUB_ID.fullmatch(str(text)) is not None


def resolve(model_id: str) -> Path:
    """The local path of a Hub model: its snapshot folder, or its GGUF file. From the cache when it is there whole,
    else downloaded (unless HF_HUB_OFFLINE=1). Raises LLMError, in one line, for a model not cached while offline, a
    repository that is missing or private, one without usable weights (pickle .bin only) and a failed download."""
    from huggingface_hub import constants

    repo = model_id.partition(":")[0]
    snapshot = cached_snapshot(repo)
    problem = f"{model_id} is not in the Hugging Face cache ({constants.HF_HUB_CACHE})"
    if snapshot is not None:
        present = [str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()]
        try:
            needed = choose_files(model_id, present)
        except LLMError as e:
            problem = f"the Hugging Face cache holds {repo} without a usable model ({e})"
        else:
            lost = missing(snapshot, needed)
            if not lost:
                return _result(snapshot, needed)
            problem = f"the Hugging Face cache holds {model_id} only in part ({', '.join(lost)} missing)"
    if constants.HF_HUB_OFFLINE:
        raise LLMError(f"{problem}, and HF_HUB_OFFLINE=1 forbids downloading it")
    needed = choose_files(model_id, _remote_files(repo))
    snapshot = _download(repo, needed)
    lost = missing(snapshot, needed)
    if lost:
        raise LLMError(f"the download of {repo} is incomplete: {', '.join(lost)} missing; run the command again")
    return _result(snapshot, needed)


def _result(snapshot: Path, needed: list[str]) -> Path:
    ggufs = [f for f in needed if f.endswith(".gguf")]
    return snapshot / ggufs[0] if ggufs else snapshot


def cached_snapshot(repo: str) -> Path | None:
    """The cached snapshot folder of repo's main revision (refs/main names it), or None. Not snapshot_download's
    offline lookup, which refuses a snapshot that lacks any file of the repository: ours hold only what is needed."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    storage = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo, repo_type="model")
    try:
        commit = (storage / "refs" / "main").read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    snapshot = storage / "snapshots" / commit
    return snapshot if commit and snapshot.is_dir() else None


def choose_files(model_id: str, files: list[str]) -> list[str]:
    """The files of a repository (files: all it has, paths relative to its root) that the model needs.

    A GGUF id gets its one file; a folder gets config.json, the tokenizer's files and the safetensors weights (one
    file, or the index and its shards). A repository of GGUF files alone, named without a tag, gets its Q4_K_M file
    as llama.cpp does. Raises LLMError naming what the repository has when nothing fits."""
    repo, _, want = model_id.partition(":")
    ggufs = sorted(f for f in files if f.endswith(".gguf"))
    if want:
        if want.endswith(".gguf"):
            chosen = [f for f in ggufs if f == want or f.rsplit("/", 1)[-1] == want]
        else:
            ends = re.compile(rf"[-._]{re.escape(want)}\.gguf", re.I)
            chosen = [f for f in ggufs if ends.search(f.rsplit("/", 1)[-1])]
        if len(chosen) != 1:
            which = "no" if not chosen else "several"
            raise LLMError(f"{repo} has {which} GGUF file{'s' if chosen else ''} matching {want!r}: choose one of "
                           f"{', '.join(f'{repo}:{f}' for f in (chosen or ggufs)) or 'none (it has no GGUF files)'}")
        return chosen
    if INDEX in files:
        weights = [INDEX, *sorted(f for f in files if SHARD.fullmatch(f))]
    elif WEIGHTS in files:
        weights = [WEIGHTS]
    elif ggufs:
        return choose_files(f"{repo}:{DEFAULT_QUANT}", files)
    else:
        pickles = [f for f in files if f.endswith((".bin", ".pt", ".pth", ".ckpt"))]
        has = f"only {', '.join(pickles[:3])} (pickle, which llm never loads)" if pickles else "no model weights"
        raise LLMError(f"{repo} has no safetensors weights and no GGUF file: {has}")
    if CONFIG not in files:
        raise LLMError(f"{repo} has weights but no {CONFIG}: not a transformers model folder")
    return [CONFIG, *(f for f in TOKENIZER_FILES if f in files), *weights]


def missing(snapshot: Path, needed: list[str]) -> list[str]:
    """The needed files not (yet) in the snapshot, the shards its index names included."""
    lost = [f for f in needed if not (snapshot / f).is_file()]
    if INDEX in needed and not lost:
        try:
            shards = set(json.loads((snapshot / INDEX).read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return [INDEX]
        lost = sorted(f for f in shards if not (snapshot / f).is_file())
    return lost


def _hub_errors() -> tuple:
    """The exceptions a Hub request raises for a reason outside the program (network, HTTP status, disk): those of
    the HTTP client this huggingface_hub uses (httpx, or httpx2 from its 2.x releases)."""
    import importlib

    from huggingface_hub.errors import HfHubHTTPError
    from huggingface_hub.utils import logging

    logging.set_verbosity_error()  # its retry warnings, several lines each: the one line is ours
    found = [HfHubHTTPError, OSError]
    for name in ("httpx2", "httpx", "requests"):
        try:
            found.append(importlib.import_module(name).HTTPError if name != "requests" else
                         importlib.import_module("requests").RequestException)
        except (ImportError, AttributeError):
            pass
    return tuple(found)


def _remote_files(repo: str) -> list[str]:
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    errors = _hub_errors()
    try:
        return HfApi().list_repo_files(repo)
    except GatedRepoError:
        raise LLMError(f"{repo} is gated on the Hugging Face Hub: accept its terms on its page, then log in "
                       "(hf auth login) or set HF_TOKEN") from None
    except RepositoryNotFoundError:
        raise LLMError(f"{repo} is neither a local path nor a model on the Hugging Face Hub (or it is private: log "
                       "in with hf auth login or set HF_TOKEN)") from None
    except errors as e:
        raise LLMError(f"could not list the files of {repo} on the Hugging Face Hub: {_one_line(e)}") from None


def _download(repo: str, files: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars, enable_progress_bars

    (enable_progress_bars if sys.stderr.isatty() else disable_progress_bars)()
    print(f"downloading {', '.join(files)} of {repo} from the Hugging Face Hub", file=sys.stderr)
    errors = _hub_errors()
    try:
        return Path(snapshot_download(repo, allow_patterns=files))
    except errors as e:
        raise LLMError(f"downloading {repo} failed: {_one_line(e)} (what was downloaded stays in the cache as "
                       "incomplete files; run the command again to resume)") from None


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())[:300] or type(error).__name__


def cached_models() -> list[dict]:
    """What -m can take from the Hugging Face cache: a folder id for each cached repository with config.json and
    safetensors weights, an ORG/NAME:FILE.gguf id for each GGUF file; with format, size in bytes and path."""
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        cache = scan_cache_dir()
    except CacheNotFound:
        return []
    found = []
    for repo in sorted(cache.repos, key=lambda r: r.repo_id.lower()):
        snapshot = cached_snapshot(repo.repo_id) if repo.repo_type == "model" else None
        if snapshot is None:
            continue
        present = [str(p.relative_to(snapshot)) for p in snapshot.rglob("*") if p.is_file()]
        try:
            needed = choose_files(repo.repo_id, present)
        except LLMError:
            needed = None
        if needed is not None and not needed[0].endswith(".gguf") and not missing(snapshot, needed):
            size = sum((snapshot / f).stat().st_size for f in present)
            found.append({"model": repo.repo_id, "format": "Hugging Face folder (safetensors)", "size_bytes": size,
                          "path": str(snapshot)})
        for name in sorted(f for f in present if f.endswith(".gguf")):
            found.append({"model": f"{repo.repo_id}:{name}", "format": "GGUF",
                          "size_bytes": (snapshot / name).stat().st_size, "path": str(snapshot / name)})
    return found
