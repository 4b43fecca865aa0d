"""Tiny models built from configs and a generated world of facts, for the demo, the tests and the benchmarks.

Nothing here downloads anything: tokenizers are built or trained in code, models are randomly initialised from
configs, and `pretrained_base` pre-trains a small Llama on invented facts so that a later fine-tune has knowledge
to forget. The world's names are made up, so no real model could know them either.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    BertConfig,
    GemmaConfig,
    GPT2Config,
    GPTNeoXConfig,
    LlamaConfig,
    MistralConfig,
    PhiConfig,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    RobertaConfig,
)

from tether.recall import exact_match_recall

ARCHITECTURES: tuple[str, ...] = ("llama", "mistral", "qwen2", "gemma", "gpt2", "gpt_neox", "phi", "bert", "roberta")
ENCODER_ONLY = ("bert", "roberta")  # no causal LM head in this library's sense: classification only
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<unk>")  # ids 0..3 in every tokenizer here, matching tiny_model
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)

# Trainer settings for the demo's fine-tunes of pretrained_base() on task_train, measured on 2 CPU cores over
# seeds 0-2, loss on the completion tokens only. With transformers.Trainer a plain run takes fact recall from ~98%
# to ~1% (under 1% already at step 50) while the task's val loss falls from ~8.5 to ~1.2, in about 2 s. The same
# run with L2-SP (lambda 0.03) keeps ~95% recall at about the same val loss; 10% of each batch drawn from the facts
# keeps ~60%, a fixed 10% subset of them ~35%. The lr is high for a pre-trained model on purpose: forgetting shows
# within seconds, and there is room for a regularizer to show what it saves.
DEMO_FINETUNE = {
    "learning_rate": 1.5e-3,  # 1e-3 forgets only to ~35% and partly recovers as the lr decays; 2e-3 also works
    "max_steps": 200,
    "per_device_train_batch_size": 16,
    "weight_decay": 0.0,
    "warmup_steps": 0,
    "lr_scheduler_type": "linear",
    "max_grad_norm": 1.0,
}


def _wrap(tokenizer: Tokenizer) -> PreTrainedTokenizerFast:
    pad, bos, eos, unk = SPECIAL_TOKENS
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token=pad, bos_token=bos, eos_token=eos, unk_token=unk
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable ASCII character (and newline), after the four special tokens."""
    chars = [*SPECIAL_TOKENS, "\n", *(chr(c) for c in range(32, 127))]
    # BPE with no merges splits every word into single characters, and Fuse joins them back without spaces.
    tokenizer = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(chars)}, merges=[], unk_token="<unk>"))
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    tokenizer.decoder = decoders.Fuse()
    return _wrap(tokenizer)


def train_bpe_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on `texts`: any string encodes, frequent words become single tokens."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return _wrap(tokenizer)


def _config(
    arch: str, vocab_size: int, hidden: int, layers: int, heads: int, positions: int, **ids: int
) -> PretrainedConfig:
    # The special token ids go in at construction: GPT-2's defaults (50256) are outside a tiny vocabulary.
    sizes = {"vocab_size": vocab_size, "hidden_size": hidden, "num_hidden_layers": layers, **ids}
    sizes |= {"num_attention_heads": heads, "intermediate_size": 4 * hidden, "max_position_embeddings": positions}
    if arch in ("llama", "mistral", "qwen2", "gemma"):
        cls = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, "gemma": GemmaConfig}[arch]
        # Gemma's default head_dim is 256 whatever the width; tie it to hidden/heads like the others.
        return cls(**sizes, num_key_value_heads=heads, head_dim=hidden // heads)
    if arch == "gpt2":
        names = {"n_embd": hidden, "n_layer": layers, "n_head": heads, "n_inner": 4 * hidden, "n_positions": positions}
        return GPT2Config(vocab_size=vocab_size, **names, **ids)
    if arch == "gpt_neox":
        return GPTNeoXConfig(**sizes)
    if arch == "phi":
        return PhiConfig(**sizes)
    # RoBERTa numbers positions from pad_token_id + 1, so it needs two spare position embeddings.
    return {"bert": BertConfig, "roberta": RobertaConfig}[arch](**(sizes | {"max_position_embeddings": positions + 2}))


def tiny_model(
    arch: str,
    task: str,
    vocab_size: int,
    *,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    seed: int = 0,
    num_labels: int = 2,
    pad_token_id: int = 0,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
    max_position_embeddings: int = 256,
) -> PreTrainedModel:
    """A randomly initialised model of `arch` for `task` ("causal_lm" or "sequence_classification"), built offline."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown synthetic architecture {arch!r}: use one of {', '.join(ARCHITECTURES)}")
    if task not in ("causal_lm", "sequence_classification"):
        raise ValueError(f"unknown task {task!r}: use 'causal_lm' or 'sequence_classification'")
    if task == "causal_lm" and arch in ENCODER_ONLY:
        raise ValueError(f"{arch} is encoder-only: use task='sequence_classification', or a decoder architecture")
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} must be a multiple of num_heads {num_heads}")
    ids = {"pad_token_id": pad_token_id, "bos_token_id": bos_token_id, "eos_token_id": eos_token_id}
    config = _config(arch, vocab_size, hidden_size, num_layers, num_heads, max_position_embeddings, **ids)
    torch.manual_seed(seed)
    if task == "causal_lm":
        return AutoModelForCausalLM.from_config(config)
    config.num_labels = num_labels
    return AutoModelForSequenceClassification.from_config(config)


# ---------------------------------------------------------------------------------------------------------------
# The world: invented facts to memorise, and a new task (small-number addition) to fine-tune on.

RELATIONS = (
    "The capital of {} is",
    "The river of {} is",
    "The king of {} is",
    "The queen of {} is",
    "The language of {} is",
    "The mountain of {} is",
)
_SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"]


@dataclass(frozen=True)
class World:
    """Generated data: facts a base model memorises, and a new task whose fine-tune should not erase them."""

    facts: list[dict]
    """{"prompt": "The capital of Vorlani is", "completion": " Pessa."}; each prompt occurs once."""
    task_train: list[dict]
    """The new task, {"prompt": "12+7=", "completion": "19"}."""
    task_val: list[dict]
    """Held-out rows of the new task, disjoint from task_train."""


def _names(rng: random.Random, count: int, syllables: int, taken: set[str]) -> list[str]:
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(syllables)).capitalize()
        if name not in taken:
            taken.add(name)
            names.append(name)
    return names


def make_world(seed: int = 0, n_facts: int = 400, n_task_train: int = 500, n_task_val: int = 100) -> World:
    """Deterministic per seed: each fact names a fresh entity, answers come from a shared pool of invented names."""
    rng = random.Random(seed)
    taken: set[str] = set()
    entities = _names(rng, n_facts, 3, taken)
    answers = _names(rng, max(n_facts // 4, 1), 2, taken)  # reused across facts, as real capitals and rivers are
    facts = [{"prompt": rng.choice(RELATIONS).format(e), "completion": f" {rng.choice(answers)}."} for e in entities]
    pairs = [(a, b) for a in range(50) for b in range(50)]
    if n_task_train + n_task_val > len(pairs):
        raise ValueError(f"n_task_train + n_task_val must be at most {len(pairs)}, the number of distinct sums")
    chosen = rng.sample(pairs, n_task_train + n_task_val)
    task = [{"prompt": f"{a}+{b}=", "completion": str(a + b)} for a, b in chosen]
    return World(facts=facts, task_train=task[:n_task_train], task_val=task[n_task_train:])


def write_world(world: World, directory: Path) -> dict[str, Path]:
    """Write facts.jsonl, task_train.jsonl and task_val.jsonl under `directory`; return their paths by name."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, rows in {"facts": world.facts, "task_train": world.task_train, "task_val": world.task_val}.items():
        paths[name] = directory / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return paths


# ---------------------------------------------------------------------------------------------------------------
# The pre-trained base: a tiny Llama that knows the world's facts, cached on disk.

BASE_VERSION = "1"  # bump when the world, the model or the pre-training change: it is part of the cache key
BASE_SETTINGS = {
    "n_facts": 400,
    "vocab_size": 512,  # answers become one or two tokens and a whole fact at most 12: short sequences are fast
    "hidden_size": 128,
    "num_layers": 2,
    "num_heads": 4,
    "learning_rate": 3e-3,  # reaches the target in 150 steps (seeds 0-2), about 5 s on one CPU thread
    "warmup_steps": 50,
    "batch_size": 64,
    "eval_every": 50,
    "max_steps": 1500,  # ten times what it takes: a run that needs more is broken, not slow
    "target_recall": 0.9,
}


@dataclass(frozen=True)
class Base:
    """A pre-trained tiny model on disk and the data it was trained for."""

    model_dir: Path
    """save_pretrained directory holding the model and its tokenizer."""
    data: dict[str, Path]
    """The world's JSONL files by name: facts, task_train, task_val."""
    recall: float
    """exact_match_recall of the saved model on the facts."""


def pretrained_base(
    cache_dir: Path | None = None, *, seed: int = 0, progress: Callable[[int, int], None] | None = None
) -> Base:
    """The cached base for `seed`, pre-training and caching it first if needed (seconds on a laptop CPU).

    The cache lives in `cache_dir`, else $TETHER_CACHE, else ~/.cache/tether, under a key of BASE_VERSION,
    BASE_SETTINGS and the seed. `progress(done, total)` is called after each pre-training step.
    """
    settings = {"version": BASE_VERSION, "seed": seed, **BASE_SETTINGS}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    root = cache_dir or Path(os.environ.get("TETHER_CACHE") or Path.home() / ".cache" / "tether")
    final = root / f"base-{key}"
    if not (final / "base.json").exists():
        _build_base(final, seed, progress)
    recall = json.loads((final / "base.json").read_text(encoding="utf-8"))["recall"]
    data = {name: final / "data" / f"{name}.jsonl" for name in ("facts", "task_train", "task_val")}
    return Base(model_dir=final / "model", data=data, recall=recall)


def _build_base(final: Path, seed: int, progress: Callable[[int, int], None] | None) -> None:
    world = make_world(seed, BASE_SETTINGS["n_facts"])
    texts = [fact["prompt"] + fact["completion"] for fact in world.facts]
    tokenizer = train_bpe_tokenizer(texts, BASE_SETTINGS["vocab_size"])
    sizes = {k: BASE_SETTINGS[k] for k in ("hidden_size", "num_layers", "num_heads")}
    model = tiny_model("llama", "causal_lm", len(tokenizer), seed=seed, **sizes)
    # Matrices this small gain little from a second thread, and on a 2-core machine two threads ran 5-20x slower
    # whenever another process was busy (OpenMP threads wait on each other): one thread is ~5 s either way.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        recall = _pretrain(model, tokenizer, world.facts, seed, progress)
    finally:
        torch.set_num_threads(threads)
    # Build next to the final directory and rename: a reader sees no base or a complete one, never half of one.
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        model.save_pretrained(tmp / "model")
        tokenizer.save_pretrained(tmp / "model")
        write_world(world, tmp / "data")
        (tmp / "base.json").write_text(json.dumps({"recall": recall, "seed": seed, **BASE_SETTINGS}, indent=1))
        try:
            os.replace(tmp, final)
        except OSError:
            if not (final / "base.json").exists():  # a concurrent build that finished first is as good as ours
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pretrain(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerFast,
    facts: list[dict],
    seed: int,
    progress: Callable[[int, int], None] | None,
) -> float:
    """Train on the facts' full text, as pre-training sees text, until their recall reaches the target."""
    s = BASE_SETTINGS
    input_ids, mask = _encode([f["prompt"] + f["completion"] for f in facts], tokenizer)
    labels = input_ids.masked_fill(mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=s["learning_rate"], weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / s["warmup_steps"]))
    batches = _shuffled_batches(len(facts), s["batch_size"], torch.Generator().manual_seed(seed))
    prompts, completions = [f["prompt"] for f in facts], [f["completion"] for f in facts]
    model.train()
    recall = 0.0
    for step, batch in zip(range(1, s["max_steps"] + 1), batches):
        model(input_ids=input_ids[batch], attention_mask=mask[batch], labels=labels[batch]).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if progress is not None:
            progress(step, s["max_steps"])
        if step % s["eval_every"] == 0:
            recall = exact_match_recall(model, tokenizer, prompts, completions)
            if recall >= s["target_recall"]:
                break
    else:
        raise RuntimeError(
            f"pre-training reached only {recall:.0%} fact recall in {s['max_steps']} steps (target "
            f"{s['target_recall']:.0%}): BASE_SETTINGS needs a higher learning rate, more steps or a larger model"
        )
    if progress is not None:
        progress(s["max_steps"], s["max_steps"])  # the target is usually reached early: fill the bar
    return recall


def _encode(texts: list[str], tokenizer: PreTrainedTokenizerFast) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded token ids, each text ending in eos, and the attention mask."""
    rows = [tokenizer(text)["input_ids"] + [tokenizer.eos_token_id] for text in texts]
    width = max(len(row) for row in rows)
    input_ids = torch.tensor([row + [tokenizer.pad_token_id] * (width - len(row)) for row in rows])
    mask = torch.tensor([[1] * len(row) + [0] * (width - len(row)) for row in rows])
    return input_ids, mask


def _shuffled_batches(n: int, size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    while True:  # epoch after epoch, each in a fresh order
        yield from torch.randperm(n, generator=generator).split(size)
