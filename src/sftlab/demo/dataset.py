"""Deterministic demo dataset: four small task families that the embedded
SmolLM2-135M-Instruct (Q4_1 GGUF, dequantised) gets wrong out of the box (it answers in
free prose) and learns in a few minutes of LoRA:

- `dates`     format conversion, any of four date styles -> ISO 8601 (exact match)
- `sentiment` fixed-label classification: positive / negative / neutral (accuracy, F1)
- `extract`   structured extraction of a person and a city as JSON (exact match)
- `list`      short rewrite of a bulleted list into one comma-separated line (BLEU/ROUGE)

Records are OpenAI-messages JSONL with `task` (and `label` for classification) kept
beside the messages, so evaluation can break results down per task.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from sftlab.errors import SftlabError

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August",
          "September", "October", "November", "December"]
FIRST = ["Maria", "James", "Aisha", "Kenji", "Olga", "Pedro", "Fatima", "Liam", "Chen", "Sofia", "Omar",
         "Greta", "Ravi", "Nora", "Tomas", "Leila", "Hugo", "Mei", "Ivan", "Zara", "Diego", "Anna", "Kofi", "Elena"]
LAST = ["Lopez", "Smith", "Khan", "Tanaka", "Ivanova", "Silva", "Haddad", "Murphy", "Wang", "Rossi", "Farouk",
        "Berg", "Patel", "Novak", "Weber", "Costa", "Dubois", "Lin", "Petrov", "Ali", "Garcia", "Nowak", "Mensah"]
CITIES = ["Denver", "Lisbon", "Osaka", "Nairobi", "Toronto", "Krakow", "Lima", "Oslo", "Austin", "Porto",
          "Seoul", "Dublin", "Cairo", "Quito", "Hamburg", "Perth", "Boston", "Milan", "Accra", "Tbilisi"]
EXTRACT_TEMPLATES = [
    "{name} moved to {city} last spring.",
    "Yesterday {name} gave a talk in {city}.",
    "After years abroad, {name} now lives in {city}.",
    "The package was sent by {name} from {city}.",
    "In {city}, {name} opened a small bakery.",
    "{name} is flying to {city} on Friday.",
]
PRODUCTS = ["headphones", "blender", "backpack", "lamp", "keyboard", "kettle", "jacket", "phone case",
            "desk chair", "water bottle", "camera", "umbrella", "toaster", "notebook", "monitor"]
SENTIMENT = {
    "positive": ["I love this {p}, it works perfectly.", "Great {p}, far better than I expected.",
                 "This {p} is excellent and arrived quickly.", "Fantastic {p}, I would buy it again.",
                 "The {p} is wonderful and very well made."],
    "negative": ["This {p} broke after two days.", "Terrible {p}, a complete waste of money.",
                 "The {p} is awful and stopped working.", "I hate this {p}, it is cheaply made.",
                 "Worst {p} I have ever owned, do not buy it."],
    "neutral": ["The {p} arrived on Tuesday.", "This {p} is blue and weighs about a kilo.",
                "I bought the {p} for my office.", "The {p} comes in a cardboard box.",
                "The {p} has two buttons and a cable."],
}
ITEMS = ["apples", "bread", "milk", "eggs", "rice", "coffee", "tea", "butter", "cheese", "pasta", "onions",
         "carrots", "soap", "paper", "pens", "tape", "batteries", "salt", "honey", "oats", "beans", "lemons"]


def _date(rng: random.Random) -> dict:
    y, m, d = rng.randint(1950, 2030), rng.randint(1, 12), rng.randint(1, 28)
    style = rng.randrange(4)
    text = [f"{MONTHS[m - 1]} {d}, {y}", f"{d} {MONTHS[m - 1]} {y}", f"{m:02d}/{d:02d}/{y} (month/day/year)",
            f"{d}.{m}.{y} (day.month.year)"][style]
    return {"task": "dates", "prompt": f"Convert this date to ISO format (YYYY-MM-DD): {text}",
            "answer": f"{y:04d}-{m:02d}-{d:02d}"}


def _sentiment(rng: random.Random) -> dict:
    label = rng.choice(sorted(SENTIMENT))
    review = rng.choice(SENTIMENT[label]).format(p=rng.choice(PRODUCTS))
    return {"task": "sentiment", "label": label,
            "prompt": f"Classify the sentiment of this review as positive, negative or neutral. "
                      f"Answer with one word.\nReview: {review}",
            "answer": label}


def _extract(rng: random.Random) -> dict:
    name, city = f"{rng.choice(FIRST)} {rng.choice(LAST)}", rng.choice(CITIES)
    sentence = rng.choice(EXTRACT_TEMPLATES).format(name=name, city=city)
    return {"task": "extract", "prompt": f"Extract the person and the city as JSON with keys name and city.\n"
                                         f"Text: {sentence}",
            "answer": json.dumps({"name": name, "city": city})}


def _list(rng: random.Random) -> dict:
    items = rng.sample(ITEMS, rng.randint(3, 6))
    bullets = "\n".join(f"- {x}" for x in items)
    return {"task": "list", "prompt": f"Rewrite this list as one comma-separated line:\n{bullets}",
            "answer": ", ".join(items), "metrics": ["bleu", "rouge"]}


TASKS: dict[str, Callable[[random.Random], dict]] = {
    "dates": _date, "sentiment": _sentiment, "extract": _extract, "list": _list,
}


def _record(item: dict, idx: int) -> dict:
    rec = {"id": f"{item['task']}-{idx}", "task": item["task"],
           "messages": [{"role": "user", "content": item["prompt"]}, {"role": "assistant", "content": item["answer"]}]}
    for key in ("label", "metrics"):  # classification label; extra metrics for evaluation
        if key in item:
            rec[key] = item[key]
    return rec


MAX_MISSES = 10_000  # consecutive repeats before a task counts as exhausted


def generate_demo(per_task: dict[str, int], seed: int = 0) -> dict[str, list[dict]]:
    """Records per split; `per_task` = examples per task for each split, e.g. {"train": 150}.

    Prompts are unique across splits, so the test split never leaks into training.
    """
    rng = random.Random(seed)
    seen: set[str] = set()
    out: dict[str, list[dict]] = {split: [] for split in per_task}
    for split, n in per_task.items():
        for task, make in TASKS.items():
            made = misses = 0
            while made < n:
                item = make(rng)
                if item["prompt"] in seen:
                    misses += 1
                    if misses > MAX_MISSES:  # the task's prompt space is used up
                        raise SftlabError(f"the demo task {task!r} cannot make {n} more unique examples for "
                                          f"{split!r} (made {made}); ask for fewer per task")
                    continue
                seen.add(item["prompt"])
                out[split].append(_record(item, len(seen)))
                made += 1
                misses = 0
        rng.shuffle(out[split])
    return out


DEFAULT_SIZES = {"train": 150, "validation": 10, "test": 25}


def write_demo_dataset(out_dir: str | Path, seed: int = 0, sizes: dict[str, int] | None = None) -> dict[str, Path]:
    """Write train/validation/test JSONL files; returns split -> path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, records in generate_demo(sizes or DEFAULT_SIZES, seed).items():
        path = out_dir / f"{split}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        paths[split] = path
    return paths
