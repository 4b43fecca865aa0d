"""Every architecture of tests/archs.py, found by structure: dropout roles, llrd depths from the order modules run,
LoRA on fused MoE experts and PEFT's refusals, and a matrix through `tether train` asserting on `tether inspect`."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import TrainerCallback

from tests.archs import ARCHS, DECODERS, saved, tiny
from tests.conftest import addition_rows, write_jsonl
from tether.cli import main
from tether.config import LoraSection, validate_config
from tether.errors import ConfigError
from tether.models import apply_lora, fused_experts
from tether.regularizers import REGISTRY, RegularizerStack, SetupContext
from tether.regularizers.dropout import ROLES, knobs, set_dropout
from tether.regularizers.l2_sp import lora_groups
from tether.regularizers.llrd import depths, run_order
from tether.run import train

ATTENTION_ONLY = ("llama", "mistral", "qwen2", "gemma", "mixtral", "qwen2_moe", "qwen3_moe", "gemma3_text", "olmo2",
                  "granite")  # fmt: skip
ROLES_OF: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(ATTENTION_ONLY, ("attention",)),
    **dict.fromkeys(("gpt2", "gpt_neox", "phi", "gptj"), ("attention", "hidden", "embedding")),
    **dict.fromkeys(("phi3", "bloom", "stablelm", "opt"), ("attention", "hidden")),
    "falcon": ("hidden",),  # rotary Falcon never applies its attention dropout (dropout.UNUSED)
    "mamba": (),
    **dict.fromkeys(("bert", "roberta", "distilbert", "deberta-v2", "electra", "xlm-roberta", "modernbert"), ROLES),
}
MOE = ("mixtral", "qwen2_moe", "qwen3_moe")
# The matrix through `tether train` runs these by default (each stands for a fix: execution order, unused rates,
# fused experts, a head PEFT saves whole, no dropout and no all-linear); the others are marked slow.
FAST = ("llama", "opt", "falcon", "gemma3_text", "mixtral", "qwen2_moe", "mamba", "xlm-roberta", "distilbert")


def test_the_tables_cover_at_least_20_architectures() -> None:
    assert set(ROLES_OF) == set(ARCHS) and len(ARCHS) >= 20


def inputs_of() -> dict[str, torch.Tensor]:
    return {"input_ids": torch.randint(4, 90, (2, 12), generator=torch.Generator().manual_seed(0))}


# ---------------------------------------------------------------------------------------------------------------
# dropout


@pytest.mark.parametrize("arch", ARCHS)
def test_each_dropout_role_acts_in_training_only_or_is_refused(arch: str) -> None:
    """Each role alone at 0.5 (the others at 0) makes two training forwards differ and leaves eval deterministic;
    a role the model lacks is refused in one line."""
    model = tiny(arch)
    found = knobs(model)
    assert tuple(found) == ROLES_OF[arch]
    x = inputs_of()
    for role in found:
        set_dropout(model, dict.fromkeys(found, 0.0) | {role: 0.5})
        assert all(getattr(model.config, key) == 0.5 for key in found[role].keys)
        model.train()
        torch.manual_seed(0)
        assert not torch.equal(model(**x).logits, model(**x).logits), f"{arch}: {role} dropout does not act"
        model.eval()
        assert torch.equal(model(**x).logits, model(**x).logits), f"{arch}: {role} dropout acts in eval mode"
    set_dropout(model, dict.fromkeys(found, 0.0))
    model.train()
    assert torch.equal(model(**x).logits, model(**x).logits), f"{arch}: a dropout no role reaches"
    for role in set(ROLES) - set(found):
        with pytest.raises(ConfigError, match=rf"^dropout\.{role}: \S+ has no {role} dropout .*: remove {role}$"):
            set_dropout(model, {role: 0.1})


@pytest.mark.parametrize("variant", [{"parallel_attn": False}, {"alibi": True}], ids=["sequential", "alibi"])
def test_falcon_has_attention_dropout_where_its_forward_applies_it(variant: dict[str, bool]) -> None:
    model = tiny("falcon", **variant)
    assert "attention" in knobs(model)
    set_dropout(model, {"attention": 0.5, "hidden": 0.0})
    model.train()
    x = inputs_of()
    assert not torch.equal(model(**x).logits, model(**x).logits)


def test_dropout_roles_are_the_same_without_the_probe(monkeypatch: pytest.MonkeyPatch) -> None:
    """FSDP2 shards run no probe forward: the roles outside the blocks then come from the holders' places."""
    from tether.regularizers import dropout

    probed = {arch: knobs(tiny(arch)) for arch in ARCHS}
    monkeypatch.setattr(dropout, "run_order", lambda model: None)
    assert {arch: knobs(tiny(arch)) for arch in ARCHS} == probed


# ---------------------------------------------------------------------------------------------------------------
# llrd


def stack_of(name: str, **fields: Any) -> RegularizerStack:
    return RegularizerStack.from_configs([REGISTRY[name].config(name=name, **fields)])


def scales(model: torch.nn.Module, decay: float = 0.5) -> dict[str, float]:
    stack = stack_of("llrd", decay=decay)
    by_id = {id(p): g["lr_scale"] for g in stack.param_groups(model) for p in g["params"]}
    return {n: by_id[id(p)] for n, p in model.named_parameters()}


def test_llrd_gives_full_lr_to_what_runs_after_the_blocks_wherever_it_is_declared() -> None:
    opt = scales(tiny("opt"))  # OPT declares final_layer_norm before its layers
    assert opt["model.decoder.final_layer_norm.weight"] == 1.0
    assert opt["model.decoder.embed_tokens.weight"] == opt["model.decoder.embed_positions.weight"] == 0.125
    xlmr = scales(tiny("xlm-roberta"))  # XLM-RoBERTa declares its classifier before roberta
    assert xlmr["classifier.dense.weight"] == xlmr["classifier.out_proj.weight"] == 1.0
    assert xlmr["roberta.encoder.layer.0.attention.self.query.weight"] == 0.25


@pytest.mark.parametrize("arch", ["gpt2", "gemma3_text", "opt"])
def test_tied_input_and_output_embeddings_take_the_embeddings_lr(arch: str) -> None:
    model = tiny(arch)
    head, embed = model.get_output_embeddings().weight, model.get_input_embeddings().weight
    assert head is embed
    depth, _ = depths(model)
    assert depth[id(head)] == 0


def test_the_depth_probe_changes_no_state() -> None:
    model = tiny("bert")
    model.train()
    model.bert.pooler.eval()  # a mixed state is restored as it was
    weights = {n: p.detach().clone() for n, p in model.state_dict().items()}
    rng = torch.get_rng_state()
    order = run_order(model)
    assert order is not None and order["classifier"] > order["bert.encoder.layer.1"]
    assert torch.equal(rng, torch.get_rng_state())
    assert model.training and model.bert.encoder.training and not model.bert.pooler.training
    assert all(torch.equal(weights[n], p) for n, p in model.state_dict().items())


# ---------------------------------------------------------------------------------------------------------------
# MoE and PEFT


@pytest.mark.parametrize("arch", MOE)
def test_lora_adapts_every_fused_expert_with_the_default_config(arch: str) -> None:
    cfg = LoraSection(r=2, alpha=4)  # the default dropout 0.05
    model = apply_lora(tiny(arch), cfg, "causal_lm")
    assert fused_experts(model) == []
    linear = [m for n, m in model.named_modules() if n.endswith("q_proj") and hasattr(m, "lora_dropout")]
    assert linear and all(m.lora_dropout["default"].p == cfg.dropout for m in linear)


@pytest.mark.parametrize("arch", MOE)
def test_l2_sp_under_lora_pulls_each_expert_by_its_own_change(arch: str) -> None:
    from peft.tuners.lora import LoraLayer

    model = apply_lora(tiny(arch), LoraSection(r=2, alpha=4, dropout=0.0), "causal_lm")
    stack = stack_of("l2_sp", strength=1.0)
    stack.setup(SetupContext(model, learning_rate=1e-3))
    assert any(g.experts == 4 for g in lora_groups(model))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0, 0.3)
    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and "default" in m.lora_A]
    expected = 0.5 * sum(m.get_delta_weight("default").double().square().sum() for m in layers)  # [E, in, out]
    (reg, _), = stack.items  # fmt: skip
    torch.testing.assert_close(reg.penalty_value().double(), expected, rtol=1e-5, atol=1e-6)


def test_fused_expert_weights_are_decayed() -> None:
    model = tiny("mixtral")
    stack = stack_of("weight_decay", strength=0.1)
    decay = {id(p): g["weight_decay"] for g in stack.param_groups(model) for p in g["params"]}
    experts = [p for n, p in model.named_parameters() if p.ndim == 3]
    assert experts and all(decay[id(p)] == 0.1 for p in experts)


def test_peft_refusals_are_one_line_naming_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=r"^lora\.dropout: PEFT refuses .*ParamWrapper.*: set it to 0"):
        apply_lora(tiny("mixtral"), LoraSection(target_modules=["q_proj", "w1", "w3"]), "causal_lm")
    config = write_config(tmp_path, "mamba", lora=True, regularizers=[])
    raw = yaml.safe_load(config.read_text())
    del raw["lora"]["target_modules"]  # all-linear
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit) as exit_:
        main_with(["train", str(config)])
    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "out_proj" in errors[0]
    assert errors[0].startswith("error: lora.target_modules: PEFT refuses")


def main_with(argv: list[str]) -> None:
    import sys

    old = sys.argv
    sys.argv = ["tether", *argv]
    try:
        main()
    finally:
        sys.argv = old


# ---------------------------------------------------------------------------------------------------------------
# the matrix through `tether train`


def sentiment_rows(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    words = {0: ["dull", "poor", "bad"], 1: ["great", "fine", "good"]}
    return [{"text": f"a {rng.choice(words[y])} film", "label": y} for y in (rng.randrange(2) for _ in range(n))]


def regularizers_of(arch: str, lora: bool) -> list[dict[str, Any]]:
    if lora:
        return [{"name": "llrd", "decay": 0.5}] if ARCHS[arch] != "causal_lm" else [
            {"name": "kl", "strength": 0.1}, {"name": "distill", "strength": 0.5}]  # fmt: skip
    dropout = [{"name": "dropout", **dict.fromkeys(ROLES_OF[arch], 0.1)}] if ROLES_OF[arch] else []
    return [{"name": "weight_decay", "strength": 0.1}, {"name": "llrd", "decay": 0.5}, *dropout,
            {"name": "l2_sp", "strength": 10.0}]  # fmt: skip


def write_config(root: Path, arch: str, lora: bool, regularizers: list[dict[str, Any]]) -> Path:
    task = ARCHS[arch]
    if task == "causal_lm":
        files = {"train": write_jsonl(root / "train.jsonl", addition_rows(16, 0)),
                 "validation": write_jsonl(root / "val.jsonl", addition_rows(4, 1))}  # fmt: skip
        fmt = "prompt_completion"
    else:
        files = {"train": write_jsonl(root / "train.jsonl", sentiment_rows(16, 0)),
                 "validation": write_jsonl(root / "val.jsonl", sentiment_rows(4, 1))}  # fmt: skip
        fmt = "text"
    raw: dict[str, Any] = {
        "model": {"path": str(saved(arch, root / "models"))},
        "task": task,
        "data": {k: str(v) for k, v in files.items()} | {"format": fmt, "max_length": 24},
        "training": {
            "learning_rate": 1e-2,
            "max_steps": 2,
            "per_device_train_batch_size": 4,
            "eval_strategy": "no",
            "save_strategy": "no",
            "lr_scheduler_type": "constant",
            "logging_steps": 1,
        },
        "regularizers": regularizers,
        "output_dir": str(root / "run"),
    }
    if lora:
        raw["lora"] = {"r": 2, "alpha": 4} | ({"target_modules": ["in_proj", "x_proj", "dt_proj"]} if arch == "mamba"
                                              else {})  # fmt: skip
    path = root / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


class Groups(TrainerCallback):
    """The optimizer's groups as the Trainer built them: (lr, weight decay, tensors)."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, float, int]] = []

    def on_step_end(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        self.seen = [(g["lr"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups]


def inspected(config: Path, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """`tether inspect CONFIG --json`, in process, parsed."""
    capsys.readouterr()
    main_with(["inspect", str(config), "--json"])
    return json.loads(capsys.readouterr().out)


MATRIX = [pytest.param(arch, lora, marks=() if arch in FAST else pytest.mark.slow, id=f"{arch}-{mode}")
          for arch in ARCHS for lora, mode in ((False, "full"), (True, "lora"))]  # fmt: skip


@pytest.mark.parametrize(("arch", "lora"), MATRIX)
def test_train_and_inspect_agree(tmp_path: Path, arch: str, lora: bool, capsys: pytest.CaptureFixture[str]) -> None:
    config = write_config(tmp_path, arch, lora, regularizers_of(arch, lora))
    plan = inspected(config, capsys)
    groups = Groups()
    cfg = validate_config(yaml.safe_load(config.read_text()))
    metrics = train(cfg, tmp_path / "run", callbacks=[groups])
    assert metrics["global_step"] == 2 and all(v == v for v in metrics["target"].values())
    # the optimizer the Trainer built is the one inspect announced
    assert groups.seen == [(g["lr"], g["weight_decay"], g["tensors"]) for g in plan["optimizer_groups"]]
    assert sum(g["tensors"] for g in plan["optimizer_groups"]) == plan["trainable"]["tensors"]
    model = tiny(arch)
    depth = plan["llrd"]["depths"] if plan["llrd"] else None
    if depth is not None:  # embeddings slowest, then each block, the final norm / head at full lr
        assert [row["depth"] for row in depth] == list(range(plan["llrd"]["depth_max"] + 1))
        embed = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
        assert any(name.endswith(embed) for name in depth[0]["modules"]) and depth[-1]["lr_scale"] == 1.0
        assert depth[-1]["modules"] and not any(n.startswith(plan["llrd"]["blocks"]) for n in depth[-1]["modules"])
    trained = tmp_path / "run" / "model"
    if lora:
        assert plan["fused_experts_without_adapter"] == []
        if ARCHS[arch] == "causal_lm":
            assert plan["reference"]["mode"] == "disable" and set(plan["anchored"] or {}) == set()
        adapter = load_file(str(trained / "adapter_model.safetensors"))
        assert any(n.endswith("lora_B.weight") and t.abs().sum() > 0 for n, t in adapter.items())
        return
    assert set(plan["dropout"] or {}) == set(ROLES_OF[arch])
    assert all(knob["modules"] for knob in (plan["dropout"] or {}).values())
    assert len(plan["anchored"]["tensors"]) == plan["trainable"]["tensors"] and plan["reference"] is None
    before = load_file(str(saved(arch, tmp_path / "models") / "model.safetensors"))
    after = load_file(str(trained / "model.safetensors"))
    assert any(not torch.equal(before[n], after[n]) for n in before if n in after)
    tied = arch in DECODERS and model.get_output_embeddings().weight is model.get_input_embeddings().weight
    if arch in DECODERS and not tied:  # a tied output layer is the embeddings (depth 0, its own test)
        head = next(n for n, m in model.named_modules() if m is model.get_output_embeddings())
        assert head in depth[-1]["modules"]


def test_inspect_shows_the_reference_setup_builds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Full fine-tuning with dropout on: the frozen copy runs in eval mode, so its output layer splits off."""
    from tether.reference import Reference, ReferenceOptions

    regs = [{"name": "dropout", "attention": 0.3, "hidden": 0.3, "embedding": 0.3}, {"name": "kl"}]
    plan = inspected(write_config(tmp_path, "gpt2", False, regs), capsys)
    model = tiny("gpt2")
    model.train()
    set_dropout(model, dict.fromkeys(ROLES_OF["gpt2"], 0.3))
    built = Reference.build(model, ReferenceOptions())
    assert plan["reference"] == {"mode": built.mode, "split": built.split, "output": "split output layer"}
    hidden = plan["dropout"]["hidden"]
    assert hidden["config_keys"] == ["resid_pdrop"] and len(hidden["modules"]) == 4  # attn.resid_dropout, mlp.dropout


def test_inspect_names_a_new_head_and_leaves_it_unanchored(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A causal LM checkpoint trained as a classifier: its score head is new, at full lr, not anchored."""
    config = write_config(tmp_path, "llama", False, [{"name": "llrd", "decay": 0.5}, {"name": "l2_sp"}])
    raw = yaml.safe_load(config.read_text())
    files = {split: write_jsonl(tmp_path / f"{split}-cls.jsonl", sentiment_rows(8, i)) for i, split in enumerate(
        ("train", "validation"))}  # fmt: skip
    raw["task"] = "sequence_classification"
    raw["data"] = {k: str(v) for k, v in files.items()} | {"format": "text", "max_length": 24}
    config.write_text(yaml.safe_dump(raw))
    plan = inspected(config, capsys)
    assert plan["new_parameters"] == ["score.weight"] == plan["anchored"]["not_anchored"]
    assert "score.weight" not in plan["anchored"]["tensors"]
    new = [g for g in plan["optimizer_groups"] if g["group"] == "new"]
    assert new == [{"group": "new", "lr": 1e-2, "weight_decay": 0.0, "tensors": 1, "parameters": 2 * 16}]


def test_a_task_the_architecture_has_no_model_for_names_task(tmp_path: Path) -> None:
    from tether.config import ModelConfig
    from tether.models import load_model

    with pytest.raises(ConfigError, match=r"^task: transformers has no sequence_classification model for .*Mamba"):
        load_model(ModelConfig(path=str(saved("mamba", tmp_path))), "sequence_classification", None)
