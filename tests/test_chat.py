"""Chat rows through the tokenizer's chat template: the loss on every assistant turn (its closing token included), or
on the last one only; tested with a ChatML-style and a Llama-3-style template written here."""

from __future__ import annotations

import pytest

from tether.data import IGNORE, encode, load_split
from tether.errors import DataError
from tether.synthetic import char_tokenizer

from .conftest import write_jsonl

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA3 = (
    "<|begin_of_text|>{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
    "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
STYLES = {  # template, its special tokens, the eos token, what closes an assistant turn
    "chatml": (CHATML, ["<|im_start|>", "<|im_end|>"], "<|im_end|>", "<|im_end|>\n"),
    "llama3": (LLAMA3, ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"], "<|eot_id|>",
               "<|eot_id|>"),
}  # fmt: skip
MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "four"},
    {"role": "user", "content": "and 3+3?"},
    {"role": "assistant", "content": "six"},
]


def tokenizer_of(style: str):
    template, specials, eos, _ = STYLES[style]
    tok = char_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.eos_token, tok.chat_template = eos, template
    return tok


def spans_with_loss(tok, example: dict) -> list[str]:
    """The text of each run of consecutive positions that carry loss."""
    spans, current = [], []
    for token, label in zip(tok.convert_ids_to_tokens(example["input_ids"]), example["labels"]):
        if label != IGNORE:
            current.append(token)
        elif current:
            spans, current = [*spans, "".join(current)], []
    return [*spans, "".join(current)] if current else spans


@pytest.mark.parametrize("style", sorted(STYLES))
def test_every_assistant_turn_carries_loss_by_default(style):
    tok, close = tokenizer_of(style), STYLES[style][3]
    (example,) = encode({"messages": MESSAGES}, "chat", "causal_lm", tok, 512)
    assert spans_with_loss(tok, example) == [f"four{close}", f"six{close}"]
    assert (
        example["input_ids"]
        == tok(tok.apply_chat_template(MESSAGES, tokenize=False), add_special_tokens=False)["input_ids"]
    )  # the rendered conversation itself, no token added (the template closes each turn with eos)


@pytest.mark.parametrize("style", sorted(STYLES))
def test_last_turn_only_as_an_option(style):
    tok, close = tokenizer_of(style), STYLES[style][3]
    (example,) = encode({"messages": MESSAGES}, "chat", "causal_lm", tok, 512, chat_loss="last")
    assert spans_with_loss(tok, example) == [f"six{close}"]


def test_a_template_without_an_end_of_turn_gets_eos_after_the_last_turn():
    tok = char_tokenizer()  # tether's synthetic template: "role: content\n" per message
    (example,) = encode({"messages": MESSAGES}, "chat", "causal_lm", tok, 512)
    assert spans_with_loss(tok, example) == ["four\n", "six\n<eos>"]


def test_chat_rows_longer_than_max_length_are_cut_and_counted(tmp_path):
    tok = tokenizer_of("chatml")
    path = write_jsonl(tmp_path / "c.jsonl", [{"messages": MESSAGES}, {"messages": MESSAGES[:3]}])
    split = load_split(str(path), "train", "chat", "causal_lm", tok, 48)
    assert split.stats.truncated == 1 and len(split.encoded[0]["input_ids"]) == 48


def test_a_template_that_rewrites_earlier_turns_is_refused():
    tok = char_tokenizer()
    tok.chat_template = "{{ messages | length }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(DataError, match="does not extend the prompt with the answer"):
        encode({"messages": MESSAGES}, "chat", "causal_lm", tok, 512)
