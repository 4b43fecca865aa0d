"""Writes examples/data/topics_{train,val}.jsonl: templated sentences about four topics, labelled by name.

The data of examples/classification.yaml, generated here from word lists (no copied text):
    python examples/make_topics.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = {
    "animals": ["cat", "dog", "horse", "owl", "fox", "whale", "goat", "frog"],
    "food": ["bread", "soup", "apple", "cheese", "rice", "pie", "salad", "honey"],
    "weather": ["rain", "snow", "wind", "fog", "storm", "sun", "hail", "frost"],
    "sport": ["tennis", "rugby", "chess", "rowing", "hockey", "boxing", "golf", "skiing"],
}
TEMPLATES = ["we talked about the {} today", "there was {} and more {}", "my notes say {} then {}", "{} again"]


def rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        label = rng.choice(sorted(WORDS))
        template = rng.choice(TEMPLATES)
        out.append({"text": template.format(*rng.sample(WORDS[label], template.count("{}"))), "label": label})
    return out


if __name__ == "__main__":
    here = Path(__file__).parent / "data"
    for name, n, seed in (("train", 160, 0), ("val", 40, 1)):
        (here / f"topics_{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(n, seed)))
