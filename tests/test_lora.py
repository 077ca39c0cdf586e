"""LoRA: only the adapters train, the adapter file is small and names its base, merging changes nothing."""

import json
import shutil

import torch
import yaml
from conftest import run_cli
from safetensors.torch import load_file, save_file
from test_finetune import INSTRUCTIONS, write_jsonl

from llmcli.formats import load_model


def test_adapter_trains_alone_is_small_and_merges(tmp_path, nano_checkpoint):
    base = tmp_path / "base"
    shutil.copytree(nano_checkpoint, base)
    data = write_jsonl(tmp_path / "inst.jsonl", INSTRUCTIONS)
    adapter = tmp_path / "adapter"
    result = run_cli("finetune", data, "-m", base, "--lora-rank", "4", "--lora-targets", "attn.qkv,mlp.fc",
                     "--lora-alpha", "8", "--lora-dropout", "0.1", "--max-steps", "10", "--lr", "1e-2",
                     "--batch-size", "4", "-o", adapter)
    assert result.returncode == 0, result.stderr
    stored = yaml.safe_load((adapter / "config.yaml").read_text())["adapter"]
    assert (stored["alpha"], stored["dropout"]) == (8.0, 0.1)
    assert "trained)" in result.stderr

    saved = load_file(adapter / "model.safetensors")
    assert saved and all(".lora_" in k for k in saved)
    assert {k.rsplit(".", 2)[-2] for k in saved} == {"qkv", "fc"}
    assert (adapter / "model.safetensors").stat().st_size < 0.1 * (base / "model.safetensors").stat().st_size
    assert yaml.safe_load((adapter / "config.yaml").read_text())["adapter"]["base"] == str(base.resolve())

    base_model, _, _ = load_model(base)
    tuned, tok, _ = load_model(adapter)  # base + adapter
    tuned_state = tuned.state_dict()
    for name, value in base_model.state_dict().items():
        assert torch.equal(tuned_state[name], value), name  # the base weights did not move
    assert any(tuned_state[k].abs().sum() > 0 for k in saved if k.endswith("lora_b"))  # the adapters did

    about = json.loads(run_cli("info", adapter, "--json").stdout)
    assert about["task"] == f"LoRA adapter (rank 4 on attn.qkv, mlp.fc) for {base.resolve()}, a language model"
    exported = tmp_path / "exported"  # export merges the adapter into its base
    assert run_cli("export", adapter, "--format", "hf", "-o", exported).returncode == 0

    merged = tmp_path / "merged"
    result = run_cli("finetune", "merge", adapter, "-o", merged)
    assert result.returncode == 0, result.stderr
    merged_model, _, _ = load_model(merged)
    assert all(".lora_" not in k for k in load_file(merged / "model.safetensors"))
    ids = torch.tensor([tok.encode("<|user|>\nSay hello.\n<|assistant|>\n")])
    with torch.no_grad():
        assert not torch.allclose(base_model(ids), tuned(ids), atol=1e-4)
        torch.testing.assert_close(merged_model(ids), tuned(ids), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(load_model(exported)[0](ids), tuned(ids), atol=1e-5, rtol=1e-5)

    # generate needs nothing new: -m ADAPTER loads base + adapter
    gen = [run_cli("generate", "Say hello.", "-m", m, "--temperature", "0", "--max-new-tokens", "8")
           for m in (adapter, merged)]
    assert all(g.returncode == 0 for g in gen), [g.stderr for g in gen]
    assert gen[0].stdout == gen[1].stdout and len(gen[0].stdout) > 1

    # the base changed: refused; the base gone: refused
    weights = load_file(base / "model.safetensors")
    weights["norm_f.weight"] = weights["norm_f.weight"] + 1
    save_file(weights, base / "model.safetensors")
    changed = run_cli("generate", "hi", "-m", adapter)
    assert changed.returncode == 1 and "adapter of a different model" in changed.stderr
    shutil.rmtree(base)
    missing = run_cli("generate", "hi", "-m", adapter)
    assert missing.returncode == 1 and "which is missing" in missing.stderr and "Traceback" not in missing.stderr
    assert json.loads(run_cli("info", merged, "--json").stdout)["parameters"] == base_model.num_params()
