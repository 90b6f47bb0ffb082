"""Alpaca-shaped synthetic chat records for the training benchmarks.

Real instruction data is dominated by short examples: a one-sentence instruction (sometimes
with a short input text), an answer of a few dozen to a few hundred tokens, now and then a
follow-up turn. The demo tasks are all short and uniform (answers of 3-20 tokens), so a
benchmark on them alone misses the shape that matters for packing and attention: many
examples of very different lengths per packed row. These records have

- an instruction of 6-25 words, with a 10-60 word input passage in ~40 % of records;
- answers of 20-300 tokens (log-normal, median ~70 tokens; these word lists give ~1 token per word);
- 2 or 3 user/assistant turns in ~15 % of records (follow-up questions, shorter answers).

The text is random but English-like (sentences from word lists), deterministic per seed.

    python bench/alpaca_data.py OUT.jsonl --n 2000     # writes OUT.jsonl, prints token statistics
"""

from __future__ import annotations

import argparse
import json
import math
import random
from pathlib import Path

VERBS = ["explain", "describe", "summarize", "list", "compare", "write", "suggest", "outline", "classify",
         "rewrite", "translate", "analyze", "give", "name", "create", "identify", "evaluate", "propose"]
TOPICS = ["the water cycle", "a healthy breakfast", "renewable energy", "the French revolution", "machine learning",
          "a job interview", "climate change", "the stock market", "a small garden", "public transport",
          "remote work", "the human heart", "a mobile app", "ancient Rome", "electric cars", "a birthday party",
          "the solar system", "good sleep habits", "a short story", "photosynthesis", "online privacy",
          "a city budget", "team meetings", "the printing press", "ocean currents", "a marketing plan"]
FRAMES = ["{v} {t} in simple terms.", "{v} three key facts about {t}.", "Please {v} {t} for a beginner.",
          "Can you {v} {t} in a few sentences?", "{v} the main benefits and risks of {t}.",
          "{v} {t} as if talking to a child.", "Briefly {v} how {t} works.",
          "{v} {t} and give one example.", "Using the text below, {v} {t}."]
FOLLOW_UPS = ["Can you make it shorter?", "Give one more example.", "Why is that important?",
              "How would this change in ten years?", "Rewrite that for a formal audience.",
              "What is the most common mistake here?"]
SUBJECTS = ["the system", "most people", "this process", "the first step", "a simple rule", "the result",
            "each part", "the main idea", "our team", "the evidence", "a good plan", "the model", "the answer"]
PREDICATES = ["depends on", "is shaped by", "often improves", "can reduce", "helps to explain", "is linked to",
              "starts with", "changes", "supports", "requires", "balances", "leads to", "protects"]
OBJECTS = ["careful planning", "the available resources", "long term goals", "daily routines", "clear feedback",
           "the surrounding environment", "small repeated steps", "local conditions", "the cost of energy",
           "a shared understanding", "several competing factors", "the quality of the data", "basic safety"]
TAILS = ["", "", " in practice", " over time", " for most users", " in many cases", " when done well",
         " according to recent studies", " at every stage"]


def sentence(rng: random.Random) -> str:
    s = f"{rng.choice(SUBJECTS)} {rng.choice(PREDICATES)} {rng.choice(OBJECTS)}{rng.choice(TAILS)}."
    return s[0].upper() + s[1:]


def text_of_words(rng: random.Random, words: int) -> str:
    """Sentences until about `words` words."""
    out, n = [], 0
    while n < words:
        s = sentence(rng)
        out.append(s)
        n += len(s.split())
    return " ".join(out)


def answer_tokens(rng: random.Random, shorter: bool = False) -> int:
    """Target answer length in tokens: log-normal, median ~70 (~35 for follow-ups), within 20-300."""
    median = 35 if shorter else 70
    return max(20, min(300, round(math.exp(rng.gauss(math.log(median), 0.7)))))


def record(rng: random.Random) -> dict:
    instruction = rng.choice(FRAMES).format(v=rng.choice(VERBS), t=rng.choice(TOPICS))
    instruction = instruction[0].upper() + instruction[1:]
    if rng.random() < 0.4:
        instruction += "\n\n" + text_of_words(rng, rng.randint(10, 60))
    messages = [{"role": "user", "content": instruction},
                {"role": "assistant", "content": text_of_words(rng, round(0.95 * answer_tokens(rng)))}]
    if rng.random() < 0.15:
        for _ in range(rng.randint(1, 2)):
            messages.append({"role": "user", "content": rng.choice(FOLLOW_UPS)})
            messages.append({"role": "assistant", "content": text_of_words(rng, round(0.95 * answer_tokens(rng, True)))})
    return {"messages": messages, "task": "alpaca"}


def write_alpaca_dataset(path: Path, n: int, seed: int = 0) -> Path:
    """`n` records as OpenAI-messages JSONL at `path`."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for _ in range(n):
            f.write(json.dumps(record(rng)) + "\n")
    return path


def write_long_dataset(path: Path, n: int, seed: int = 0, answer_words: int = 400) -> Path:
    """`n` single-turn records of ~480 tokens each (a long answer): one example per 512-token row."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        for _ in range(n):
            prompt = rng.choice(FRAMES).format(v=rng.choice(VERBS), t=rng.choice(TOPICS))
            answer = " ".join(text_of_words(rng, answer_words).split()[:answer_words])
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            f.write(json.dumps({"messages": messages, "task": "long"}) + "\n")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--n", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    write_alpaca_dataset(args.out, args.n, args.seed)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(Path(__file__).resolve().parents[1] / "tests/fixtures/smollm2-tokenizer")
    rows = [json.loads(x) for x in args.out.read_text().splitlines()]
    total = sorted(len(tok.apply_chat_template(r["messages"], tokenize=True)["input_ids"]) for r in rows)
    answers = sorted(len(tok(m["content"])["input_ids"]) for r in rows for m in r["messages"] if m["role"] == "assistant")
    multi = sum(len(r["messages"]) > 2 for r in rows)
    q = lambda xs, p: xs[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
    print(f"{len(rows)} records ({multi} multi-turn) in {args.out}")
    print(f"tokens per record (chat template): median {q(total, 0.5)}, p10 {q(total, 0.1)}, p90 {q(total, 0.9)}, "
          f"max {total[-1]}, mean {sum(total) / len(total):.0f}")
    print(f"answer tokens: median {q(answers, 0.5)}, p10 {q(answers, 0.1)}, p90 {q(answers, 0.9)}, "
          f"min {answers[0]}, max {answers[-1]}")


if __name__ == "__main__":
    main()
