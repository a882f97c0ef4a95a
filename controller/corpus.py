"""Text the controller is built from, and the WikiText-2 split it must never train on.

WikiText-2 validation (../shared/data/wikitext2_valid.txt) is cut into its 60
articles (lines `` = Title = ``). Every fourth article (index % 4 == 3) is held
out for evaluation (benchmarks/controller_eval.py); the others, plus the GSM8K
training problems, are training text. HellaSwag is never used here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
WIKITEXT = DATA / "wikitext2_valid.txt"
GSM8K = DATA / "gsm8k_train500.jsonl"
HELLASWAG = DATA / "hellaswag_dev.txt"
HELDOUT_EVERY = 4  # article i is held out when i % 4 == 3

_TITLE = re.compile(r"^ = [^=].* = $")


def wikitext_articles(path: Path = WIKITEXT) -> list[str]:
    """The articles of a WikiText file, each with its title line, in file order."""
    arts: list[list[str]] = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if _TITLE.match(line):
            arts.append([])
        if arts:
            arts[-1].append(line)
    return ["\n".join(a).strip("\n") + "\n" for a in arts]


def is_heldout(i: int) -> bool:
    return i % HELDOUT_EVERY == HELDOUT_EVERY - 1


def wikitext_split(path: Path = WIKITEXT) -> tuple[list[str], list[str]]:
    """(training articles, held-out articles)."""
    arts = wikitext_articles(path)
    return [a for i, a in enumerate(arts) if not is_heldout(i)], [a for i, a in enumerate(arts) if is_heldout(i)]


def gsm8k_texts(path: Path = GSM8K) -> list[str]:
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            d = json.loads(line)
            out.append(f"Question: {d['question']}\nAnswer: {d['answer']}\n")
    return out


def training_texts() -> list[tuple[str, str]]:
    """(source, text) of every training document."""
    train, _ = wikitext_split()
    return [("wikitext2", t) for t in train] + [("gsm8k", t) for t in gsm8k_texts()]
