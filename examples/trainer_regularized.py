"""A plain transformers.Trainer script, regularized with tether: the lines marked `# added` are all that changed
(l2_sp + ewc + kl + replay against forgetting, early stopping against overfitting). The regularizers read one half
of the facts and forgetting is measured on the other, rows never trained on. Runs offline on a tiny model built in
code; put your own model, tokenizer and data in their place. EXAMPLE_STEPS sets the length."""

import os
from pathlib import Path

from datasets import Dataset
from transformers import DataCollatorForLanguageModeling, EarlyStoppingCallback, Trainer, TrainingArguments

import tether  # added
from tether.synthetic import char_tokenizer, tiny_model

steps = int(os.environ.get("EXAMPLE_STEPS", "60"))
tokenizer = char_tokenizer()
model = tiny_model("llama", "causal_lm", len(tokenizer))  # AutoModelForCausalLM.from_pretrained(...) in real use
facts = Dataset.from_json(str(Path(__file__).parent / "data" / "facts.jsonl"))  # what the model must not forget
held, measured = facts.train_test_split(0.5, seed=0).values()  # added
rows = Dataset.from_list([{"text": f"{a}+{b}={a + b}"} for a in range(30) for b in range(10)])
train, val = rows.map(lambda r: tokenizer(r["text"]), remove_columns=["text"]).train_test_split(0.1, seed=0).values()
args = TrainingArguments(
    "out/trainer", max_steps=steps, learning_rate=3e-3, per_device_train_batch_size=16, report_to=[], use_cpu=True,
    eval_strategy="steps", eval_steps=max(steps // 4, 1), save_steps=max(steps // 4, 1),  # added
    load_best_model_at_end=True, metric_for_best_model="eval_loss",  # added
)  # fmt: skip
trainer = Trainer(
    model=model, args=args, train_dataset=train, eval_dataset=val, processing_class=tokenizer,
    data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    callbacks=[EarlyStoppingCallback(early_stopping_patience=2)],  # added
)  # fmt: skip
before = tether.knowledge(model, tokenizer, measured)  # added
regularizers = [{"name": "l2_sp", "strength": 0.01}, {"name": "ewc", "strength": 0.3}, {"name": "kl", "strength": 0.1}]
trainer = tether.regularize(trainer, [*regularizers, {"name": "replay", "ratio": 0.1}], reference=held)  # added
trainer.train()
print("forgetting:", tether.forgetting(trainer.model, tokenizer, measured, before))  # added
