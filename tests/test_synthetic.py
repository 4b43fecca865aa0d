"""Tiny models, tokenizers and the generated world; recall scoring; the cached pre-trained base (slow)."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tether import synthetic
from tether.recall import exact_match_recall
from tether.synthetic import (
    ARCHITECTURES,
    ENCODER_ONLY,
    char_tokenizer,
    make_world,
    pretrained_base,
    tiny_model,
    train_bpe_tokenizer,
    write_world,
)


def test_char_tokenizer_round_trips_every_printable_character():
    tokenizer = char_tokenizer()
    text = string.printable.replace("\t", "").replace("\r", "").replace("\x0b", "").replace("\x0c", "")
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text)  # one token per character, no special tokens added
    assert tokenizer.decode(ids) == text
    special = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
    assert special == (0, 1, 2, 3)


def test_chat_template_renders_roles_and_generation_prompt():
    tokenizer = char_tokenizer()
    messages = [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]
    assert tokenizer.apply_chat_template(messages, tokenize=False) == "user: 2+2?\nassistant: 4\n"
    prompt = tokenizer.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "user: 2+2?\nassistant: "


def test_bpe_tokenizer_learns_frequent_words_and_encodes_anything():
    tokenizer = train_bpe_tokenizer(["The capital of Vorland is Pessa."] * 50, vocab_size=300)
    assert len(tokenizer) <= 300
    assert tokenizer.convert_ids_to_tokens(tokenizer(" Pessa")["input_ids"]) == ["ĠPessa"]
    unseen = "12+7=19 ~é"
    assert tokenizer.decode(tokenizer(unseen)["input_ids"]) == unseen  # byte-level: nothing is unknown
    assert tokenizer.pad_token_id == 0 and tokenizer.eos_token_id == 2


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("task", ["causal_lm", "sequence_classification"])
def test_tiny_model_builds_and_gives_a_finite_loss(arch, task):
    if task == "causal_lm" and arch in ENCODER_ONLY:
        with pytest.raises(ValueError, match="encoder-only"):
            tiny_model(arch, task, vocab_size=100)
        return
    model = tiny_model(arch, task, vocab_size=100, num_labels=3)
    input_ids = torch.randint(4, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    labels = input_ids if task == "causal_lm" else torch.tensor([0, 2])
    loss = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), labels=labels).loss
    assert torch.isfinite(loss)
    assert sum(p.numel() for p in model.parameters()) < 100_000  # tiny, as the tests' speed relies on


def test_tiny_model_is_seeded():
    a, b = tiny_model("llama", "causal_lm", 100, seed=3), tiny_model("llama", "causal_lm", 100, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_tiny_model_rejects_an_unknown_architecture():
    with pytest.raises(ValueError, match="unknown synthetic architecture 'mamba': use one of llama"):
        tiny_model("mamba", "causal_lm", 100)


def test_make_world_is_deterministic_with_unique_prompts_and_a_disjoint_val_split():
    world = make_world(seed=1)
    assert world == make_world(seed=1)
    assert world.facts != make_world(seed=2).facts
    prompts = [fact["prompt"] for fact in world.facts]
    assert len(prompts) == len(set(prompts)) == 400
    assert all(f["completion"].startswith(" ") and f["completion"].endswith(".") for f in world.facts)
    train = {row["prompt"] for row in world.task_train}
    assert len(train) == len(world.task_train) and not train & {row["prompt"] for row in world.task_val}
    a, b = (int(x) for x in world.task_train[0]["prompt"].rstrip("=").split("+"))
    assert world.task_train[0]["completion"] == str(a + b)


def test_write_world_writes_one_json_object_per_line(tmp_path: Path):
    world = make_world(n_facts=20, n_task_train=10, n_task_val=5)
    paths = write_world(world, tmp_path / "data")
    rows = {name: [json.loads(line) for line in path.read_text().splitlines()] for name, path in paths.items()}
    assert rows == {"facts": world.facts, "task_train": world.task_train, "task_val": world.task_val}


@torch.no_grad()
def _greedy_alone(model, tokenizer, prompt: str, n: int) -> str:
    input_ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    out = model.generate(input_ids=input_ids, max_new_tokens=n, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, input_ids.shape[1] :])


def test_recall_is_one_on_the_models_own_greedy_output_and_low_on_random_text():
    tokenizer = char_tokenizer()
    model = tiny_model("llama", "causal_lm", len(tokenizer), seed=0)
    prompts = ["a", "The capital of", "12+7=", "xyz qrs tuv wxy"]  # different lengths: the batch is left-padded
    own = [_greedy_alone(model, tokenizer, prompt, 4) for prompt in prompts]
    rng = random.Random(0)
    noise = ["".join(rng.choice(string.ascii_letters) for _ in range(4)) for _ in prompts]
    model.train()
    assert exact_match_recall(model, tokenizer, prompts, own, batch_size=3) == 1.0
    assert exact_match_recall(model, tokenizer, prompts, noise) < 0.25
    assert model.training  # restored
    assert tokenizer.padding_side == "right"  # untouched


def test_recall_rejects_mismatched_or_empty_completions():
    tokenizer = char_tokenizer()
    model = tiny_model("llama", "causal_lm", len(tokenizer))
    with pytest.raises(ValueError, match="one completion each"):
        exact_match_recall(model, tokenizer, ["a", "b"], ["c"])
    with pytest.raises(ValueError, match="has no tokens"):
        exact_match_recall(model, tokenizer, ["a"], [""])


def test_pretrained_base_builds_once_per_key_and_honours_tether_cache(tmp_path: Path, monkeypatch):
    builds = []

    def fake_build(final: Path, seed: int, progress) -> None:
        builds.append(final)
        final.mkdir(parents=True)
        (final / "base.json").write_text(json.dumps({"recall": 0.5}))

    monkeypatch.setattr(synthetic, "_build_base", fake_build)
    monkeypatch.setenv("TETHER_CACHE", str(tmp_path / "env"))
    first, again = pretrained_base(seed=0), pretrained_base(seed=0)
    assert first == again and len(builds) == 1 and first.recall == 0.5
    assert first.model_dir.parent.parent == tmp_path / "env" and first.model_dir.parent.name.startswith("base-")
    other = pretrained_base(tmp_path / "explicit", seed=1)
    assert len(builds) == 2 and other.model_dir.parent.parent == tmp_path / "explicit"


@pytest.mark.slow
def test_pretrained_base_reaches_the_target_recall_and_reloads(tmp_path: Path):
    calls = []
    base = pretrained_base(tmp_path, progress=lambda done, total: calls.append((done, total)))
    assert base.recall >= 0.9
    assert calls[-1][0] == calls[-1][1]  # the bar ends full
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary directory left behind
    model = AutoModelForCausalLM.from_pretrained(base.model_dir)
    tokenizer = AutoTokenizer.from_pretrained(base.model_dir)
    facts = [json.loads(line) for line in base.data["facts"].read_text().splitlines()]
    prompts, completions = [f["prompt"] for f in facts], [f["completion"] for f in facts]
    assert exact_match_recall(model, tokenizer, prompts, completions) == pytest.approx(base.recall)
    assert pretrained_base(tmp_path) == base  # cached: no second pre-training
