"""The transformers internals tether leans on, named: an upgrade that changes one fails here, with its name, rather
than somewhere inside a training run."""

from __future__ import annotations

import inspect

from transformers import Trainer, TrainingArguments

from tether.trainer import RegularizedMixin


def test_trainer_internals_tether_overrides_or_reads() -> None:
    # RegularizedMixin._save_checkpoint stages the checkpoint by calling the Trainer's with args.output_dir swapped
    assert list(inspect.signature(Trainer._save_checkpoint).parameters) == ["self", "model", "trial"]
    assert "_get_output_dir" in vars(Trainer)  # where _save_checkpoint writes (swapped there)
    # the penalty's share under gradient accumulation mirrors Trainer.training_step's own scaling decision
    source = inspect.getsource(Trainer.training_step)
    for name in ("loss_is_scaled_for_ga", "model_accepts_loss_kwargs", "current_gradient_accumulation_steps"):
        assert name in source, name
    assert "average_tokens_across_devices" in vars(TrainingArguments)["__dataclass_fields__"]
    assert "num_processes" in inspect.getsource(Trainer.compute_loss)  # the task loss's scaling by processes


def test_under_fsdp2_the_optimizer_is_built_before_the_scheduler() -> None:
    """tether defers its setup to create_scheduler (after the sharding) and builds groups from structure alone in
    create_optimizer: both rely on this order, which tests/test_step_order.py replays through train()."""
    source = inspect.getsource(Trainer._prepare_for_training)
    assert source.index("self.create_optimizer(") < source.index("self.create_scheduler(")
    assert "is_fsdp2" in source
    assert RegularizedMixin.create_scheduler is not Trainer.create_scheduler


def test_a_finished_run_is_restored_as_train_leaves_it() -> None:
    """tether.run.restore_end: a run killed after training ended is rebuilt from its last checkpoint with the
    Trainer's own loaders, and training_ended reads the control the Trainer saved with it."""
    assert list(inspect.signature(Trainer._load_from_checkpoint).parameters)[:2] == ["self", "resume_from_checkpoint"]
    assert list(inspect.signature(Trainer._load_best_model).parameters) == ["self"]
    finalize = inspect.getsource(Trainer._finalize_training)
    assert "load_best_model_at_end" in finalize and "self._load_best_model()" in finalize
    save = inspect.getsource(Trainer._save_checkpoint)  # the control (should_training_stop) goes into the state
    assert "[self.control]" in save and "stateful_callbacks" in save


def test_peft_internals_corda_resolves_targets_with() -> None:
    """tether.models.corda_init resolves all-linear before PEFT's preprocess_corda reads the target names."""
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    assert list(inspect.signature(_maybe_include_all_linear_layers).parameters) == ["peft_config", "model"]


def test_peft_osf_internals_wise_ft_and_merge_read() -> None:
    """wise_ft.osf_folded folds an OSF layer's change into its weight and sets U_low, S_low, V_low back to their
    start, read from PEFT's private copies: the change is then exactly zero (tests/test_osf.py checks the values)."""
    import torch
    from peft import OSFConfig, get_peft_model

    from tether.synthetic import tiny_model

    model = get_peft_model(tiny_model("llama", "causal_lm", 32, hidden_size=16), OSFConfig(target_modules=["q_proj"]))
    layer = next(m for m in model.modules() if hasattr(m, "osf_svd_params"))
    adapter = model.active_adapter
    start = {k: getattr(layer, f"_osf_{k}_init")[adapter] for k in ("U_low", "S_low", "V_low")}
    assert set(layer.osf_svd_params[adapter]) == set(start)
    assert torch.equal(layer.get_delta_weight(adapter), torch.zeros_like(layer.get_base_layer().weight))
