"""LoRA adapter checkpoints: our checkpoint layout holding only the trained tensors, with the base model's path.

config.yaml has an `adapter` section (rank, alpha, dropout, targets, base, base_fingerprint) and the run's task;
model.safetensors holds the adapters' A and B matrices (and a classifier's head). Loading rebuilds the model the run
trained from its base (prepare_model) and puts the adapter's tensors in.
"""

from pathlib import Path

from llmcli.errors import LLMError
from llmcli.formats.ours import CONFIG_FILE, MODEL_FILE


def prepare_model(base_model, run: dict):
    """The model a run trains, from its base: a classifier head when the task is classification, and LoRA
    adapters (everything else frozen) when the run has an adapter section."""
    from llmcli.model.heads import from_language_model
    from llmcli.model.lora import add_lora

    model = base_model
    if run["task"] == "classify":
        model = from_language_model(base_model, len(run["labels"]))
    if "adapter" in run:
        a = run["adapter"]
        model = add_lora(model, a["rank"], a["alpha"], a["dropout"], a["targets"])
    return model


def base_path(directory: Path, config: dict) -> Path:
    """The base model an adapter names; raises LLMError when it is gone."""
    base = Path(config["adapter"]["base"])
    if not base.exists():
        raise LLMError(f"{directory} is a LoRA adapter of {base}, which is missing; put the base model back there "
                       f"or edit adapter.base in {directory / CONFIG_FILE}")
    return base


def load_adapter(directory: Path, config: dict, base_model, device: str = "cpu"):
    """base_model (loaded from base_path) with the adapter of directory in it, in eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from llmcli.model.lora import fingerprint

    if fingerprint(base_model) != config["adapter"]["base_fingerprint"]:
        raise LLMError(f"{directory} is a LoRA adapter of a different model than the one now at "
                       f"{config['adapter']['base']} (its weights changed); it needs the base it was trained on")
    model = prepare_model(base_model, config)
    try:
        weights = load_file(str(directory / MODEL_FILE))
    except (SafetensorError, OSError) as e:
        raise LLMError(f"{directory / MODEL_FILE} is corrupt: {e}") from None
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(weights) != expected:
        raise LLMError(f"{directory / MODEL_FILE} does not hold this adapter's weights "
                       f"({len(weights)} tensors, expected {len(expected)})")
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=False)
    return model.to(device).eval()
