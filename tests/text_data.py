"""A synthetic N-class text classification dataset (deterministic): each class has its own
cue words mixed into shared filler, so a small model can learn it in a few steps."""

from __future__ import annotations

import csv
import random
from pathlib import Path

CLASSES = ["anger", "fear", "joy", "love", "sadness"]
CUES = {
    "anger": ["furious", "outraged", "livid", "infuriated"],
    "fear": ["terrified", "scared", "frightened", "panicked"],
    "joy": ["delighted", "thrilled", "cheerful", "overjoyed"],
    "love": ["adore", "cherish", "beloved", "affection"],
    "sadness": ["miserable", "heartbroken", "gloomy", "sorrowful"],
}
FILLER = ("the a today yesterday about my our this that with at home work school friend weather morning "
          "evening train city road letter phone call meeting lunch dinner book film song garden").split()


def rows(n: int, seed: int, classes: list[str] = CLASSES) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = classes[i % len(classes)]
        words = [rng.choice(FILLER) for _ in range(rng.randint(6, 14))]
        for _ in range(2):
            words.insert(rng.randrange(len(words) + 1), rng.choice(CUES[label]))
        out.append({"id": f"r{seed}-{i}", "text": "I feel " + " ".join(words) + ".", "label": label})
    rng.shuffle(out)
    return out


def write(path: Path, data: list[dict], columns=("id", "text", "label")) -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), extrasaction="ignore")
        w.writeheader()
        w.writerows(data)
    return path
