"""Checkpoint I/O of a training run: save (atomically), prune, and load the training state to resume.

A checkpoint is a directory RUN/checkpoints/step-NNNNNNN: the weights, config.yaml, the tokenizer, the optimizer
state in safetensors (and the fp32 weights when those on disk are rounded) and the step in JSON. It is written under
a temporary name and renamed into place, so a kill leaves a whole checkpoint or none; RUN/model.safetensors is a hard
link to the latest weights. Tensors are whole (FSDP shards gathered), so any number of processes resumes any.
"""

import json
import os
import secrets
import shutil
from pathlib import Path

import torch

from llmcli.errors import LLMError
from llmcli.files import atomic_write, file_mode
from llmcli.formats import ours as checkpoint
from llmcli.text.tokenizer import tokenizer_files

CHECKPOINTS_DIR = "checkpoints"
TRAIN_STATE_FILE = "train_state.safetensors"  # optimizer moments (and fp32 weights when saved in a lower precision)
TRAIN_STATE_META = "train_state.json"  # step, validation loss, tokens seen, time


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first (a temporary directory left by a kill is not one)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith("step-") and (p / TRAIN_STATE_META).is_file()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def saved_weights(model) -> dict[str, torch.Tensor]:
    """What a checkpoint stores: every weight, or only the trained ones when some are frozen (the frozen ones are
    a base model's, which the checkpoint's config names: see llmcli.lora)."""
    if all(p.requires_grad for p in model.parameters()):
        return model.state_dict()
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def whole_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP shard (gathered from all processes: every process must call this), else itself."""
    from torch.distributed.tensor import DTensor

    return (tensor.full_tensor() if isinstance(tensor, DTensor) else tensor).detach().contiguous()


def checkpoint_tensors(model, optimizer: torch.optim.Optimizer, save_dtype
                       ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(weights in save_dtype, training state: optimizer moments and, when the weights are rounded, the fp32
    weights), as whole tensors. Under FSDP every process must call it: the shards are gathered."""
    if hasattr(model, "reshard"):  # FSDP leaves the root's parameters gathered after a forward without gradients
        model.reshard()
    names = {p: n for n, p in model.named_parameters()}
    weights = {k: whole_tensor(v) for k, v in saved_weights(model).items()}
    state = {}
    for part in getattr(optimizer, "optimizers", [optimizer]):  # Muon and AdamW: each parameter is in one
        for group in part.param_groups:
            for p in group["params"]:
                for key, value in part.state.get(p, {}).items():
                    state[f"optimizer.{names[p]}.{key}"] = whole_tensor(value)
    if save_dtype != torch.float32:  # the weights on disk are rounded: keep the fp32 ones to resume exactly
        state.update({f"weights.{k}": v for k, v in weights.items()})
    return {k: v.to(save_dtype) for k, v in weights.items()}, state


def _fsync_tree(directory: Path):
    for path in directory.iterdir():
        with open(path, "rb") as f:
            os.fsync(f.fileno())
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(run_dir: Path, step: int, weights: dict, state: dict, run: dict, meta: dict, keep_last: int
                    ) -> Path:
    """Write checkpoints/step-NNNNNNN atomically (temporary directory, then rename), point the run directory's
    model.safetensors at it, and delete old checkpoints beyond the last keep_last and the best."""
    from safetensors import SafetensorError
    from safetensors.torch import save_file

    root = run_dir / CHECKPOINTS_DIR
    final = root / f"step-{step:07d}"
    tmp = root / f".tmp-{final.name}"
    try:
        root.mkdir(parents=True, exist_ok=True, mode=file_mode(directory=True))
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(mode=file_mode(directory=True))  # exclusive: fails on anything left at that name
        save_file(weights, str(tmp / checkpoint.MODEL_FILE), metadata={"step": str(step)})
        save_file(state, str(tmp / TRAIN_STATE_FILE))
        for file in tokenizer_files(run_dir):
            shutil.copyfile(file, tmp / file.name)
        config = {"format": checkpoint.FORMAT, **run, "checkpoint": meta}
        (tmp / checkpoint.CONFIG_FILE).write_text(yaml_dump(config), encoding="utf-8")
        (tmp / TRAIN_STATE_META).write_text(json.dumps(meta, indent=1), encoding="utf-8")
        for path in tmp.iterdir():  # safetensors creates its files 0600: the one mode policy (file_mode)
            os.chmod(path, file_mode())
        _fsync_tree(tmp)
        if final.exists():  # the same step saved again (an interrupt right after a save): swap it
            old = root / f".old-{final.name}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old)
        else:
            os.rename(tmp, final)
        # the run directory itself stays a checkpoint of the latest weights: a hard link costs no space
        link = run_dir / f".{checkpoint.MODEL_FILE}.{secrets.token_hex(8)}.tmp"
        try:
            os.link(final / checkpoint.MODEL_FILE, link)
        except OSError:
            shutil.copyfile(final / checkpoint.MODEL_FILE, link)
        os.replace(link, run_dir / checkpoint.MODEL_FILE)
    except (OSError, SafetensorError) as e:  # a full disk, a quota, a file size limit
        shutil.rmtree(tmp, ignore_errors=True)
        previous = checkpoint_dirs(run_dir)
        kept = f"the previous checkpoint ({previous[-1]}) is intact" if previous else "no earlier checkpoint exists"
        reason = getattr(e, "strerror", None) or str(e).rsplit(": ", 1)[-1]
        raise LLMError(f"could not save the checkpoint of step {step} in {root}: {reason}; {kept}") from None
    _prune_checkpoints(run_dir, keep_last)
    return final


def _prune_checkpoints(run_dir: Path, keep_last: int):
    dirs = checkpoint_dirs(run_dir)
    metas = {p: json.loads((p / TRAIN_STATE_META).read_text()) for p in dirs}
    with_val = [p for p in dirs if metas[p].get("val_loss") is not None]
    keep = set(dirs[-max(1, keep_last):])
    if with_val:
        keep.add(min(with_val, key=lambda p: metas[p]["val_loss"]))
    for path in dirs:
        if path not in keep:
            # renamed first, so that a kill while deleting leaves no half checkpoint, only a leftover removed at start
            doomed = path.with_name(f".old-{path.name}")
            try:
                os.rename(path, doomed)
            except OSError:
                continue
            shutil.rmtree(doomed, ignore_errors=True)


def load_train_state(directory: Path, model, optimizer) -> dict:
    """Put a checkpoint's weights and optimizer state into model and optimizer; return its metadata."""
    meta, state = load_train_weights(directory, model)
    load_optimizer_state(state, model, optimizer)
    return meta


def load_train_weights(directory: Path, model) -> tuple[dict, dict]:
    """Put a checkpoint's weights into the (not yet sharded) model; return its metadata and training state."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        meta = json.loads((directory / TRAIN_STATE_META).read_text(encoding="utf-8"))
        state = load_file(str(directory / TRAIN_STATE_FILE))
        weights = {k[len("weights."):]: v for k, v in state.items() if k.startswith("weights.")}
        if not weights:
            weights = load_file(str(directory / checkpoint.MODEL_FILE))
        expected = saved_weights(model)
        if set(weights) != set(expected):
            raise ValueError(f"its weights are not this model's ({len(weights)} tensors, expected {len(expected)})")
        model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    except (OSError, ValueError, SafetensorError, RuntimeError) as e:
        raise LLMError(f"cannot resume from {directory}: {str(e).splitlines()[0]}") from None
    return meta, state


def load_optimizer_state(state: dict, model, optimizer):
    """Put the saved optimizer moments of each parameter into optimizer, sharded like the parameter under FSDP."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    owner = {p: part for part in getattr(optimizer, "optimizers", [optimizer])
             for group in part.param_groups for p in group["params"]}
    for name, p in model.named_parameters():
        moments = {k.rsplit(".", 1)[1]: v for k, v in state.items() if k.rsplit(".", 1)[0] == f"optimizer.{name}"}
        for key, value in moments.items():
            value = value.to(p.device)
            if isinstance(p, DTensor) and value.shape == p.shape:
                value = distribute_tensor(value, p.device_mesh, p.placements)
            moments[key] = value
        if moments:
            owner[p].state[p] = moments


def yaml_dump(config: dict) -> str:
    import yaml

    return yaml.safe_dump(config, sort_keys=False)


def first_val_loss(metrics_path: Path):
    for line in metrics_path.read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        if "val_loss" in row:
            return row["val_loss"]
    return None


def truncate_metrics(path: Path, step: int):
    """Drop the rows of steps after the checkpoint: the resumed run writes them again."""
    if not path.is_file():
        return
    rows = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and _row_step(line) is not None and _row_step(line) <= step]
    atomic_write(path, "".join(r + "\n" for r in rows))


def _row_step(line: str):
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return None  # a row cut short by a kill


def clear_leftovers(run_dir: Path):
    """Delete what a kill during a save or a prune left: temporary checkpoint directories and model links."""
    for leftover in [*(run_dir / CHECKPOINTS_DIR).glob(".*-step-*"), *run_dir.glob(f".{checkpoint.MODEL_FILE}.*")]:
        shutil.rmtree(leftover, ignore_errors=True) if leftover.is_dir() else leftover.unlink(missing_ok=True)


def kept_note(run_dir: Path, what: str = "the last checkpoint") -> str:
    """What is left when a run stops on an error, for its message."""
    last = checkpoint_dirs(run_dir)
    return f"{what} ({last[-1]}) is kept" if last else "no checkpoint was saved"
