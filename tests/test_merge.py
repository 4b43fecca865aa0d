"""merge: its arithmetic against naive state-dict loops (global, per layer, Fisher-weighted), DARE's expectation, TIES
against a naive implementation and PEFT's, the choice and what is saved, and one `tether train` run."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from tests.test_reference_regularizers import Finish, batch_of, lora, merged_weights, model_of, sgd_steps, stack_of
from tether.config import validate_config
from tether.regularizers.merge import Merge, Search, coordinate_moves, dare, ties
from tether.run import train


def tuned_merge(tmp_path: Path, use_lora: bool = False, **fields) -> tuple[nn.Module, nn.Module, Merge, Finish]:
    """(original, model after a few SGD steps, its Merge, a Finish measuring one batch and one reference batch)."""
    model = lora(model_of()) if use_lora else model_of()
    original = copy.deepcopy(model)
    stack = stack_of(model, {"name": "merge", **fields})
    sgd_steps(model, stack, [batch_of(8, seed=i) for i in range(5)], lr=0.5)
    merge = stack.items[0][0]
    assert isinstance(merge, Merge)
    return original, model, merge, Finish(tmp_path, batch_of(8, seed=50), batch_of(8, seed=60))


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def depth_by_name(name: str, blocks: int = 2) -> int:
    """The naive depth of a tiny Llama's parameter: embeddings 0, model.layers.i at i + 1, the rest last."""
    if "embed_tokens" in name:
        return 0
    if ".layers." in name:
        return int(name.split(".layers.")[1].split(".")[0]) + 1
    return blocks + 1


def candidate(model: nn.Module, merge: Merge, search: Search, name: str) -> dict[str, torch.Tensor]:
    merge.set(search.values[name]())
    return state(model)


def test_merge_arithmetic_equals_a_naive_state_dict_loop(tmp_path: Path):
    fields = {"alphas": [0, 0.5, 1], "search_evaluations": 6, "densities": [1.0], "fisher_scales": [2.0]}
    original, model, merge, finish = tuned_merge(tmp_path, **fields)
    before, after = state(original), state(model)
    fisher = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(i)) for i, (n, p) in
              enumerate(before.items())}  # fmt: skip
    save_file(fisher, str(tmp_path / "fisher.safetensors"))
    result = merge.after_training(model, finish.ctx)
    torch.testing.assert_close(state(model), after)  # the trained weights are back
    search = Search(merge, model, finish.evaluate, [after[n] - before[n] for n in merge.names])
    search.run(None)
    mean = sum(f.sum() for f in fisher.values()) / sum(f.numel() for f in fisher.values())
    layer_row = next(r for r in result["candidates"] if r["method"] == "layers")
    naive = {
        "global 0.5": {n: before[n] + 0.5 * (after[n] - before[n]) for n in before},
        "ties 1 x 1": after,  # density 1 keeps every entry
        "dare 1 x 0.5": {n: before[n] + 0.5 * (after[n] - before[n]) for n in before},
        layer_row["candidate"]: {
            n: before[n] + layer_row["layer_alphas"][depth_by_name(n)] * (after[n] - before[n]) for n in before
        },
    }
    for name, expected in naive.items():
        torch.testing.assert_close(candidate(model, merge, search, name), expected, msg=name)
    fisher_weights = [2.0 / (2.0 + fisher[n] / mean) for n in merge.names]
    assert "fisher 2" not in search.values  # no Fisher given to this search: no such candidate
    rebuilt = Search(merge, model, finish.evaluate, search.delta)
    rebuilt.run([f / mean for f in (fisher[n] for n in merge.names)])
    got = candidate(model, merge, rebuilt, "fisher 2")
    for n, w in zip(merge.names, fisher_weights):
        torch.testing.assert_close(got[n], before[n] + w * (after[n] - before[n]), msg=n)
    by_name = {r["candidate"]: r for r in result["candidates"]}
    assert "fisher 2" in by_name and by_name["fisher 2"]["scale"] == 2.0  # the run's Fisher file was read
    assert (tmp_path / "merge.png").exists() and set(finish.saved) == {"model_merge"}


def test_under_lora_each_candidate_is_an_adapter_of_the_same_rank(tmp_path: Path):
    original, model, merge, finish = tuned_merge(
        tmp_path, use_lora=True, alphas=[0, 0.5, 1], search_evaluations=0, densities=[0.5], fisher_scales=[]
    )
    result = merge.after_training(model, finish.ctx)
    search = Search(merge, model, finish.evaluate, [p.detach() - s for p, s in zip(merge.params, merge.start)])
    search.run(None)
    shapes = {n: p.shape for n, p in model.named_parameters() if "lora_" in n}
    merge.set(search.values["ties 0.5 x 1"]())
    assert {n: p.shape for n, p in model.named_parameters() if "lora_" in n} == shapes
    assert all("lora_B" in n for n in merge.names)  # the factor that was zero at setup, nothing else
    assert {r["method"] for r in result["candidates"]} == {"global", "dare", "ties"}
    assert merged_weights(original).keys() == merged_weights(model).keys()


def test_lora_global_alpha_is_the_scaled_weight_update(tmp_path: Path):
    original, model, merge, finish = tuned_merge(
        tmp_path, use_lora=True, alphas=[0, 0.5, 1], search_evaluations=0, densities=[], fisher_scales=[]
    )
    tuned = copy.deepcopy(model)
    search = Search(merge, model, finish.evaluate, [p.detach() - s for p, s in zip(merge.params, merge.start)])
    search.run(None)
    merge.set(search.values["global 0.5"]())
    w0, w1, half = (merged_weights(m) for m in (original, tuned, model))
    for name, value in half.items():
        torch.testing.assert_close(value, (w0[name] + w1[name]) / 2, atol=1e-6, rtol=1e-5, msg=name)


def test_dare_keeps_the_expected_delta_and_drops_the_rest():
    delta = [torch.randn(64, 32, generator=torch.Generator().manual_seed(0)), torch.randn(50)]
    draws = [dare(delta, 0.3, seed) for seed in range(600)]
    mean = [torch.stack([d[i] for d in draws]).mean(0) for i in range(2)]
    for m, d in zip(mean, delta):
        assert (m - d).abs().mean() < 0.1 * d.abs().mean()  # E[dare(delta)] = delta: within sampling error
    one = draws[0][0]
    kept = one != 0
    torch.testing.assert_close(one[kept], delta[0][kept] / 0.3)  # kept entries are rescaled by 1 / density
    assert 0.25 < kept.float().mean() < 0.35
    torch.testing.assert_close(dare(delta, 0.3, 7)[0], dare(delta, 0.3, 7)[0])  # seeded
    assert not torch.equal(dare(delta, 0.3, 7)[0], dare(delta, 0.3, 8)[0])


def naive_ties(deltas: list[torch.Tensor], density: float) -> torch.Tensor:
    """TIES entry by entry: trim each delta to its k largest magnitudes, elect the sign of the trimmed sum, average
    the kept entries that carry it."""
    flat = [d.flatten().tolist() for d in deltas]
    k = int(density * len(flat[0]))
    trimmed = []
    for values in flat:
        keep = set(sorted(range(len(values)), key=lambda i: -abs(values[i]))[:k])
        trimmed.append([v if i in keep else 0.0 for i, v in enumerate(values)])
    out = []
    for i in range(len(flat[0])):
        column = [t[i] for t in trimmed]
        sign = 1.0 if sum(column) >= 0 else -1.0
        agree = [v for v in column if v != 0 and (v > 0) == (sign > 0)]
        out.append(sum(agree) / len(agree) if agree else 0.0)
    return torch.tensor(out).view_as(deltas[0])


@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_equals_a_naive_implementation_and_peft(n: int, density: float):
    from peft.utils.merge_utils import ties as peft_ties

    gen = torch.Generator().manual_seed(n)
    deltas = [torch.randn(6, 7, generator=gen) for _ in range(n)]
    torch.testing.assert_close(ties(deltas, density), naive_ties(deltas, density))
    if density < 1:  # PEFT warns and skips the trimming at density 1
        torch.testing.assert_close(ties(deltas, density), peft_ties(deltas, torch.ones(n), density))


def test_coordinate_moves_try_each_other_value_per_position_until_a_pass_keeps_nothing():
    alphas = [0.5, 0.5]
    seen = []
    for trial in coordinate_moves(alphas, [0.0, 0.5, 1.0]):
        seen.append(trial)
        if trial == [1.0, 0.5]:
            alphas[:] = trial  # kept: the next trials start from it
    assert seen[:4] == [[0.0, 0.5], [1.0, 0.5], [1.0, 0.0], [1.0, 1.0]]
    assert seen[4:] == [[0.0, 0.5], [0.5, 0.5], [1.0, 0.0], [1.0, 1.0]]  # a second pass, which keeps nothing


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_the_saved_model_follows_the_candidates(tmp_path: Path, alpha: float):
    original, model, merge, finish = tuned_merge(
        tmp_path, alphas=[alpha], search_evaluations=0, densities=[], fisher_scales=[]
    )
    tuned = state(model)
    result = merge.after_training(model, finish.ctx)
    assert result["chosen"] == f"global {alpha:g}"
    expected = state(original) if alpha == 0 else tuned
    torch.testing.assert_close(state(finish.saved["model_merge"]), expected)
    assert result["target"]["val_loss"] == pytest.approx(
        finish.evaluate(finish.saved["model_merge"])["target"]["val_loss"]
    )


def test_choice_is_the_least_forgetting_within_tolerance(tmp_path: Path):
    _, model, merge, finish = tuned_merge(tmp_path, alphas=[0, 0.5, 1], search_evaluations=4, densities=[0.5])
    result = merge.after_training(model, finish.ctx)
    rows = result["candidates"]
    best = min(r["val_loss"] for r in rows)
    close = [r for r in rows if r["val_loss"] <= best * 1.05]
    assert result["chosen"] == min(close, key=lambda r: (r["reference_loss"], -r["alpha"]))["candidate"]
    assert "fisher" in result and "fisher" not in {r["method"] for r in rows}  # no Fisher in this run: said so
    assert sum(r["method"] == "layers" for r in rows) <= 4


def test_train_with_merge_and_the_ewc_fisher(raw_config: dict, tmp_path: Path):
    raw = copy.deepcopy(raw_config)
    raw["training"] = {"learning_rate": 3e-3, "max_steps": 6, "per_device_train_batch_size": 8, "eval_strategy": "no"}
    raw["regularizers"] = [
        {"name": "ewc", "strength": 0.0},
        {"name": "merge", "alphas": [0, 0.5, 1], "search_evaluations": 3, "densities": [0.5], "fisher_scales": [1]},
    ]
    out = tmp_path / "run"
    metrics = train(validate_config(raw), out)
    saved = json.loads((out / "metrics.json").read_text())["merge"]
    methods = [r["method"] for r in saved["candidates"]]
    assert methods.count("global") == 3 and methods.count("layers") == 3 and "fisher" in methods
    tuned = next(r for r in saved["candidates"] if r["candidate"] == "global 1")
    assert tuned["val_loss"] == pytest.approx(metrics["target"]["val_loss"], rel=1e-5)
    chosen = next(r for r in saved["candidates"] if r["candidate"] == saved["chosen"])
    assert saved["target"]["val_loss"] == chosen["val_loss"] and "forgetting" in saved
    assert (out / "model_merge" / "model.safetensors").exists() and (out / "merge.png").exists()
    assert "merge candidates" in (out / "report.html").read_text()


def test_the_chosen_merge_joins_a_sweeps_candidates():
    from tether.harness.sweep.objective import candidates

    metrics = {"target": {"val_loss": 1.0}, "merge": {"chosen": "layers 1,0.5", "target": {"val_loss": 1.1},
                                                       "forgetting": {"delta_loss": 0.2}}}  # fmt: skip
    assert candidates(metrics)[1] == {
        "model": "model_merge", "metrics": {"target.val_loss": 1.1, "forgetting.delta_loss": 0.2}
    }  # fmt: skip
    metrics["merge"]["chosen"] = "global 1"  # the fine-tuned model: model/ itself
    assert [c["model"] for c in candidates(metrics)] == ["model"]


def test_merge_through_the_python_api_measures_forgetting(tmp_path: Path):
    import tether
    from tests.test_api import FACTS, trainer

    regularizers = [{"name": "merge", "alphas": [0, 1], "search_evaluations": 0, "densities": []}]
    t = tether.regularize(trainer(tmp_path, eval_strategy="no"), regularizers, reference=FACTS)
    t.eval_dataset = t.train_dataset
    t.train()
    result = tether.finish(t)["merge"]
    assert {r["candidate"] for r in result["candidates"]} == {"global 0", "global 1"}
    assert all("delta_loss" in r for r in result["candidates"]) and "forgetting" in result
    assert (tmp_path / "model_merge").is_dir()


def test_no_layer_search_when_the_trained_tensors_sit_at_one_depth(tmp_path: Path):
    model = model_of()
    for name, p in model.named_parameters():
        p.requires_grad_("lm_head" in name)
    stack = stack_of(model, {"name": "merge", "alphas": [0, 1], "densities": [], "fisher_scales": []})
    merge = stack.items[0][0]
    assert merge.depth == []
    result = merge.after_training(model, Finish(tmp_path, batch_of(4, seed=1)).ctx)
    assert [r["method"] for r in result["candidates"]] == ["global", "global"] and "layer_alphas" not in result


def test_peft_merges_a_single_adapter_linearly_whatever_the_combination_type():
    """Why merge does not use PEFT's add_weighted_adapter for one fine-tune (module docstring): it ignores ties."""
    model = lora(model_of())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(generator=torch.Generator().manual_seed(0))
    model.add_weighted_adapter(["default"], [1.0], "ties", combination_type="ties", density=0.1)
    model.add_weighted_adapter(["default"], [1.0], "linear", combination_type="linear")
    ties_, linear = ({n: p for n, p in model.named_parameters() if f".{k}." in n} for k in ("ties", "linear"))
    for (n, a), b in zip(ties_.items(), linear.values()):
        torch.testing.assert_close(a, b, msg=n)  # density 0.1 kept every entry
