"""A plain TRL SFTTrainer script, regularized with tether: the lines marked `# added` are all that changed (l2_sp +
ewc + kl + replay against forgetting, early stopping against overfitting). The reference is general text (Python's
own help pages), given as a datasets.Dataset: the regularizers read one half of it and forgetting is measured on the
other, rows never trained on. Runs offline on a tiny model built in code; EXAMPLE_STEPS sets the length."""

import os
import pydoc

from datasets import Dataset
from transformers import EarlyStoppingCallback
from trl import SFTConfig, SFTTrainer

import tether  # added
from tether.synthetic import char_tokenizer, tiny_model

steps = int(os.environ.get("EXAMPLE_STEPS", "60"))
tokenizer = char_tokenizer()
model = tiny_model("llama", "causal_lm", len(tokenizer))  # AutoModelForCausalLM.from_pretrained(...) in real use
rows = Dataset.from_list([{"prompt": f"{a}+{b}=", "completion": f"{a + b}"} for a in range(30) for b in range(10)])
train, val = rows.train_test_split(test_size=0.1, seed=0).values()
help_text = pydoc.render_doc(pydoc.Doc, renderer=pydoc.plaintext).splitlines()
reference = Dataset.from_list([{"text": line.strip()} for line in help_text if len(line.strip()) > 20][:32])
held, measured = reference.train_test_split(0.5, seed=0).values()  # added
args = SFTConfig(
    "out/sft", max_steps=steps, learning_rate=3e-3, per_device_train_batch_size=16, max_length=64, report_to=[],
    use_cpu=True, eval_strategy="steps", eval_steps=max(steps // 4, 1), save_steps=max(steps // 4, 1),  # added
    load_best_model_at_end=True, metric_for_best_model="eval_loss",  # added
)  # fmt: skip
trainer = SFTTrainer(
    model=model, args=args, train_dataset=train, eval_dataset=val, processing_class=tokenizer,
    callbacks=[EarlyStoppingCallback(early_stopping_patience=2)],  # added
)  # fmt: skip
before = tether.knowledge(model, tokenizer, measured)  # added
regularizers = [{"name": "l2_sp", "strength": 0.01}, {"name": "ewc", "strength": 0.3}, {"name": "kl", "strength": 0.1}]
trainer = tether.regularize(trainer, [*regularizers, {"name": "replay", "ratio": 0.1}], reference=held)  # added
trainer.train()
print("forgetting:", tether.forgetting(trainer.model, tokenizer, measured, before))  # added
