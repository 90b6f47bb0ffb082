"""Data-preparation benchmark (not a test): curate speed, near-duplicate precision/recall,
and validate's peak memory when streaming a large JSONL.

    .venv/bin/python bench/curate_bench.py                 # all three, default sizes
    .venv/bin/python bench/curate_bench.py --rows 0        # skip the 1M-row streaming run

Goals (issue 5): curate 100,000 conversations (exact + near-dup + filters) in <= 60 s on a
2-core machine; near-dup recall >= 0.9 at precision >= 0.95 on a constructed set of
near-identical / lightly paraphrased pairs among hard negatives (same templates, other content).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import string
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import run_child  # noqa: E402

from sftlab.data.conversation import Conversation  # noqa: E402

TEMPLATES = (
    "Summarize the following text in two sentences:",
    "Explain the main idea of this passage to a beginner:",
    "Answer the question using the context below.",
    "Rewrite this paragraph in a formal tone:",
    "List the key facts mentioned in the text:",
    "Translate the following notes into plain English:",
)
SYNONYMS = {"following": "next", "text": "passage", "main": "central", "explain": "describe", "key": "important",
            "below": "here", "beginner": "novice", "plain": "simple", "list": "name", "facts": "points"}


def _vocabulary(rng: random.Random, size: int = 4000) -> list[str]:
    common = "the a of and to in is that it for on was with as by at from this be are or an".split()
    made = {"".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 10))) for _ in range(size)}
    return common * 20 + sorted(made)


def _sentence(rng: random.Random, vocab: list[str], lo: int, hi: int) -> str:
    words = rng.choices(vocab, k=rng.randint(lo, hi))
    return " ".join(words).capitalize() + "."


def make_conversation(rng: random.Random, vocab: list[str], source: str) -> Conversation:
    passage = " ".join(_sentence(rng, vocab, 6, 16) for _ in range(rng.randint(2, 5)))
    answer = " ".join(_sentence(rng, vocab, 6, 16) for _ in range(rng.randint(2, 5)))
    return Conversation(messages=[{"role": "user", "content": f"{rng.choice(TEMPLATES)}\n\n{passage}"},
                                  {"role": "assistant", "content": answer}], source=source)


def _typo(word: str, rng: random.Random) -> str:
    if len(word) < 3:
        return word
    i = rng.randrange(len(word))
    return word[:i] + rng.choice(string.ascii_lowercase) + word[i + 1:]


def perturb(text: str, rng: random.Random, kind: str) -> str:
    """A near-identical or lightly paraphrased version of `text`."""
    words = text.split(" ")
    if kind == "format":  # casing, punctuation, whitespace
        out = text.lower().replace(".", " .").replace(",", "")
        return "  ".join(out.split(" ")) if rng.random() < 0.5 else out.upper()
    if kind == "typos":
        for i in rng.sample(range(len(words)), min(rng.randint(1, 2), len(words))):
            words[i] = _typo(words[i], rng)
    elif kind == "edit":  # insert / delete / replace 1-3 words
        for _ in range(rng.randint(1, 3)):
            i = rng.randrange(len(words))
            op = rng.choice(("ins", "del", "rep"))
            if op == "ins":
                words.insert(i, rng.choice(("really", "also", "very", "just", "then")))
            elif op == "del" and len(words) > 5:
                del words[i]
            else:
                words[i] = rng.choice(("thing", "part", "idea", "case"))
    elif kind == "paraphrase":  # synonyms in the instruction, a reworded opening
        words = [SYNONYMS.get(w.lower().strip(":,."), w) for w in words]
        words = ["Please", words[0].lower(), *words[1:]]
    elif kind == "trim":  # last sentence dropped or a short one appended
        sentences = text.split(". ")
        return ". ".join(sentences[:-1]) + "." if len(sentences) > 3 else text + " That is all."
    return " ".join(words)


PERTURBATIONS = ("format", "typos", "edit", "paraphrase", "trim")


def make_near_dup_set(n_pairs: int, n_negatives: int, seed: int = 0) -> tuple[list[Conversation], dict[str, str]]:
    """Originals, one near-duplicate per pair (each message perturbed), and hard negatives:
    half are new conversations on the same instruction templates, half are siblings of an
    original that share its passage but ask another thing and answer differently (as in
    reading-comprehension sets: one context, many questions). Returns (conversations,
    {duplicate source: original source}); the order is shuffled, so a variant may come first."""
    rng = random.Random(seed)
    vocab = _vocabulary(rng)
    convs, truth, originals = [], {}, []
    for i in range(n_pairs):
        orig = make_conversation(rng, vocab, f"pair{i}:a")
        kind = PERTURBATIONS[i % len(PERTURBATIONS)]
        dup = Conversation(messages=[{**m, "content": perturb(m["content"], rng, kind)} for m in orig.messages],
                           source=f"pair{i}:b:{kind}")
        convs += [orig, dup]
        originals.append(orig)
        truth[dup.source] = orig.source
        truth[orig.source] = dup.source  # whichever comes first is kept
    for i in range(n_negatives):
        neg = make_conversation(rng, vocab, f"neg{i}")
        if i % 2:
            passage = rng.choice(originals).messages[0]["content"].split("\n\n", 1)[1]
            question = _sentence(rng, vocab, 8, 14).rstrip(".") + "?"
            neg.messages[0]["content"] = f"{question}\n\n{passage}"
        convs.append(neg)
    rng.shuffle(convs)
    return convs, truth


def near_dup_scores(convs: list[Conversation], truth: dict[str, str], **options) -> dict[str, float]:
    from sftlab.data.curate import CurateOptions, curate

    opts = CurateOptions(empty_answer=False, prompt_echo=False, repetition=False, refusal=False, **options)
    _, report = curate(convs, opts)
    removed = [r for r in report.removals if r["reason"] in ("exact duplicate", "near duplicate")]
    correct = [r for r in removed if truth.get(r["source"]) == r["duplicate_of"]]
    pairs = len(truth) // 2
    per_kind = {k: sum(f":{k}" in r["source"] + r["duplicate_of"] for r in correct) / (pairs / len(PERTURBATIONS))
                for k in PERTURBATIONS}
    return {"pairs": pairs, "removed": len(removed), "correct": len(correct),
            "recall": round(len(correct) / pairs, 4), "precision": round(len(correct) / len(removed), 4) if removed else 1.0,
            "recall_by_kind": {k: round(v, 3) for k, v in per_kind.items()}}


def make_corpus(n: int, seed: int = 1) -> list[Conversation]:
    """n conversations: ~5% exact duplicates, ~5% near duplicates, ~2% low quality."""
    rng = random.Random(seed)
    vocab = _vocabulary(rng)
    convs: list[Conversation] = []
    for i in range(n):
        r = rng.random()
        if convs and r < 0.05:
            c = rng.choice(convs)
            convs.append(Conversation(messages=c.messages, source=f"row{i}"))
        elif convs and r < 0.10:
            c = rng.choice(convs)
            kind = rng.choice(PERTURBATIONS)
            convs.append(Conversation(messages=[{**m, "content": perturb(m["content"], rng, kind)} for m in c.messages],
                                      source=f"row{i}"))
        elif r < 0.12:
            c = make_conversation(rng, vocab, f"row{i}")
            c.messages[-1]["content"] = rng.choice(("...", "I'm sorry, but I can't help with that.",
                                                    " ".join(["the same words again"] * 12)))
            convs.append(c)
        else:
            convs.append(make_conversation(rng, vocab, f"row{i}"))
    return convs


def bench_curate(n: int) -> dict:
    from sftlab.data.curate import CurateOptions, curate

    convs = make_corpus(n)
    t0, c0 = time.perf_counter(), time.process_time()
    kept, report = curate(convs, CurateOptions())
    seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
    return {"conversations": n, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
            "per_second": round(n / seconds), "kept": len(kept), "removed": dict(report.removed),
            "peak_rss_mb_with_corpus": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}


def bench_validate_stream(rows: int, workdir: Path) -> dict:
    """Peak RSS of `sftlab data validate --skip` on a `rows`-line JSONL, against a 1/10 size file,
    with and without exact dedup (whose index holds one entry per unique record)."""
    def write(path: Path, n: int) -> None:
        rng = random.Random(2)
        with open(path, "w") as f:
            for i in range(n):
                f.write(json.dumps({"prompt": f"Question {i}: what is {rng.randint(0, 10**9)}?",
                                    "completion": f"The answer is {rng.randint(0, 10**9)}."}) + "\n")

    out = {}
    for n in (rows // 10, rows):
        src = workdir / f"rows{n}.jsonl"
        write(src, n)
        for flags in ([], ["--no-dedup"]):
            run = run_child([sys.executable, "-m", "sftlab.cli", "data", "validate", str(src), "--skip",
                             "--out", str(workdir / f"clean{n}.jsonl"), *flags], echo=False)
            out[f"{n} rows{' ' + flags[0] if flags else ''}"] = {
                "seconds": round(run.wall_s, 1), "peak_rss_mb": round(run.peak_rss / 2**20), "rc": run.returncode,
                "file_mb": round(src.stat().st_size / 2**20)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000, help="conversations to curate")
    ap.add_argument("--pairs", type=int, default=2000, help="near-duplicate pairs in the constructed set")
    ap.add_argument("--negatives", type=int, default=6000, help="hard negatives in the constructed set")
    ap.add_argument("--rows", type=int, default=1_000_000, help="JSONL rows for the streaming validate run (0: skip)")
    args = ap.parse_args()

    results = {}
    if args.rows:  # first: a child forked from a big parent would inherit its peak RSS
        with tempfile.TemporaryDirectory() as d:
            results["validate_stream"] = bench_validate_stream(args.rows, Path(d))
        print("validate streaming:", results["validate_stream"], flush=True)
    convs, truth = make_near_dup_set(args.pairs, args.negatives)
    results["near_dup"] = near_dup_scores(convs, truth)
    print("near-dup (default options):", results["near_dup"], flush=True)
    results["curate"] = bench_curate(args.n)
    print("curate:", results["curate"], flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
