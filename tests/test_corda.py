"""lora.init corda_kpm / corda_ipm: CorDA adapters through PEFT, calibrated on the held-out reference rows."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import load_file

from tether.config import LoraSection, validate_config
from tether.errors import ConfigError
from tether.models import apply_lora
from tether.run import train
from tether.synthetic import tiny_model

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def model_and_rows():
    torch.manual_seed(0)
    model = tiny_model("llama", "causal_lm", 40, hidden_size=32, num_layers=2, num_heads=4, seed=0)
    rows = [{"input_ids": torch.randint(4, 40, (1, 12))} for _ in range(16)]
    return model, rows


@pytest.mark.parametrize("init", ["corda_kpm", "corda_ipm"])
def test_corda_adapters_are_pefts_own_and_leave_the_outputs_unchanged(init):
    from peft import LoraConfig, TaskType, get_peft_model
    from peft.tuners.lora.config import CordaConfig
    from peft.tuners.lora.corda import preprocess_corda

    model, rows = model_and_rows()
    probe = torch.randint(4, 40, (2, 10))
    before = model(input_ids=probe).logits
    ours = apply_lora(copy.deepcopy(model), LoraSection(r=4, dropout=0.0, init=init), "causal_lm", iter(rows))
    by_hand = copy.deepcopy(model)
    corda = CordaConfig(corda_method=init.removeprefix("corda_"))
    config = LoraConfig(r=4, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, task_type=TaskType.CAUSAL_LM,
                        init_lora_weights="corda", corda_config=corda)  # fmt: skip

    def run_model():
        with torch.no_grad():
            for row in rows:
                by_hand(**row)

    preprocess_corda(by_hand, config, run_model=run_model)
    by_hand = get_peft_model(by_hand, config)
    mine, theirs = dict(ours.named_parameters()), dict(by_hand.named_parameters())
    assert mine.keys() == theirs.keys()
    for name in mine:
        torch.testing.assert_close(mine[name], theirs[name], msg=name)
    torch.testing.assert_close(ours(input_ids=probe).logits, before, rtol=1e-4, atol=1e-4)  # moved, not added
    assert any(".lora_B." in n and p.abs().sum() > 0 for n, p in mine.items())  # not a zero start
    assert ours.training  # the calibration pass leaves the mode as it was


def _raw(raw_config: dict, init: str) -> dict:
    raw = copy.deepcopy(raw_config)
    raw["lora"] = {"r": 4, "init": init, "calibration_rows": 8}
    raw["regularizers"] = [{"name": "kl", "strength": 0.5}]
    raw["training"].update(max_steps=6, learning_rate=1e-2, eval_strategy="no", save_strategy="no")
    return raw


def test_train_with_corda_kpm_calibrates_on_the_held_out_reference_rows(raw_config, tmp_path):
    corda = train(validate_config(_raw(raw_config, "corda_kpm")), tmp_path / "corda")
    plain = train(validate_config(_raw(raw_config, "default")), tmp_path / "plain")
    roles = corda["reference_roles"]
    assert "lora.init corda_kpm" in roles["readers"] and roles["held_out_rows"] > 0
    assert roles["trained_on_measured"] is False
    whole = plain["reference_roles"]["measured_rows"]  # no reader there: every reference row is measured
    assert roles["measured_rows"] + roles["held_out_rows"] == whole
    a = load_file(str(tmp_path / "corda" / "model" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "plain" / "model" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and any(not torch.equal(a[n], b[n]) for n in a)


def test_corda_kpm_needs_reference_data(raw_config):
    raw = _raw(raw_config, "corda_kpm")
    del raw["data"]["reference"]
    with pytest.raises(ConfigError, match="lora.init corda_kpm preserves what data.reference needs"):
        validate_config(raw)
