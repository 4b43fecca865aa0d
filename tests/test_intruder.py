"""intruder: PEFT's intruder-dimension reduction as a second final model of a LoRA run, through `tether train`."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from tether.config import validate_config
from tether.errors import ConfigError
from tether.regularizers.intruder import IntruderConfig, reduced_factors
from tether.run import train
from tether.synthetic import tiny_model


def _raw(raw_config: dict, **fields) -> dict:
    raw = copy.deepcopy(raw_config)
    raw["lora"] = {"r": 4}
    raw["regularizers"] = [{"name": "intruder", **fields}]
    raw["training"].update(max_steps=8, learning_rate=3e-2, eval_strategy="no", save_strategy="no")
    return raw


def _adapter(run, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(run / name / "adapter_model.safetensors"))


def deltas(adapter: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """B @ A of every adapted module (the factors of a refit adapter differ; their product is what acts)."""
    return {n.removesuffix("lora_A.weight"): adapter[n.replace("lora_A", "lora_B")] @ a
            for n, a in adapter.items() if n.endswith("lora_A.weight")}  # fmt: skip


def test_the_reduced_adapter_is_measured_and_saved_beside_the_trained_one(raw_config, tmp_path):
    kept = train(validate_config(_raw(raw_config, threshold=0.99, mitigation=1.0)), tmp_path / "kept")
    trained, reduced = (
        deltas(_adapter(tmp_path / "kept", "model")),
        deltas(_adapter(tmp_path / "kept", "model_intruder")),
    )
    for name, delta in trained.items():  # lambda 1 keeps every direction: the same weight change, refactored
        torch.testing.assert_close(reduced[name], delta, rtol=1e-4, atol=1e-5)
    cut = train(validate_config(_raw(raw_config, threshold=0.99, mitigation=0.0)), tmp_path / "cut")
    assert cut["intruder"]["changed_factors"] > 0
    assert cut["intruder"]["target"]["val_loss"] != cut["target"]["val_loss"]
    trained, reduced = (
        deltas(_adapter(tmp_path / "cut", "model")),
        deltas(_adapter(tmp_path / "cut", "model_intruder")),
    )
    assert trained.keys() == reduced.keys() and any(not torch.allclose(trained[n], reduced[n]) for n in trained)
    assert kept["intruder"]["forgetting"].keys() == kept["forgetting"].keys()


def test_the_factors_are_peft_reduction_and_the_model_is_left_as_it_was():
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    model = get_peft_model(tiny_model("llama", "causal_lm", 40, hidden_size=16, num_layers=2, num_heads=2),
                           LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))  # fmt: skip
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    factors, values = reduced_factors(model, IntruderConfig(name="intruder", threshold=0.99, mitigation=0.0))
    assert {n: p.detach() for n, p in model.named_parameters()}.keys() == before.keys()  # the extra adapter is gone
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    reference = copy.deepcopy(model)
    reduce_intruder_dimension(reference, "default", "cut", 10, 0.99, 0.0, logging_sink=None)
    want = {n.replace(".cut.", ".default."): p for n, p in reference.named_parameters() if ".cut." in n}
    names = [n for n, p in model.named_parameters() if any(p is f for f in factors)]
    for name, value in zip(names, values):
        torch.testing.assert_close(value, want[name])


def test_intruder_without_lora_is_refused_from_the_config(raw_config):
    raw = _raw(raw_config)
    del raw["lora"]
    with pytest.raises(ConfigError, match=r"regularizers\[0\]: intruder reduces a LoRA adapter's intruder dimensions"):
        validate_config(raw)
