"""Data report: one self-contained HTML page (plots embedded as base64 PNG), a Markdown
summary with the PNG files beside it, and `summary.json` holding every number shown.

Besides the dataset itself it shows what earlier steps recorded in their JSON summaries:
`sftlab data validate` (rejects by reason, duplicates), `curate` (filter effects,
duplicates and near-duplicates with examples), `split` (split sizes) and `review`
(decisions, labels and scores from the review log beside the data, or the summary an
export of it wrote).
"""

from __future__ import annotations

import base64
import io
import json
import statistics
from collections import Counter
from pathlib import Path
from typing import Any

from sftlab.data.conversation import Conversation, message_text
from sftlab.data.load import Reading, as_reading
from sftlab.errors import SftlabError
from sftlab.files import atomic_write, write_json


def _lengths(texts: list[str], tokenizer) -> list[int]:
    if tokenizer is None:
        return [len(t.split()) for t in texts]
    if not texts:
        return []
    return [len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {"count": 0}
    ordered = sorted(values)
    return {"count": len(values), "min": ordered[0], "median": statistics.median(ordered),
            "mean": round(statistics.fmean(ordered), 2), "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
            "max": ordered[-1]}


def dataset_summary(convs: list[Conversation], tokenizer=None) -> tuple[dict[str, Any], dict[str, list[int]]]:
    """Numbers for the report, and the raw length lists the histograms are drawn from."""
    chats = [c for c in convs if c.is_chat]
    prompts = ["\n".join(m["content"] for m in c.messages if m["role"] != "assistant") for c in chats]
    responses = ["\n".join(message_text(m) for m in c.messages if m["role"] == "assistant") for c in chats]
    raw = [c.text for c in convs if c.text is not None]
    segmented = [c.written_text for c in convs if c.segments is not None]  # template-free, whole as written
    series = {"prompt": _lengths(prompts, tokenizer), "response": _lengths(responses, tokenizer),
              "raw_text": _lengths(raw, tokenizer), "segments": _lengths(segmented, tokenizer)}
    turns = Counter(sum(m["role"] == "assistant" for m in c.messages) for c in chats)
    roles = Counter(m["role"] for c in chats for m in c.messages)
    summary = {
        "conversations": len(convs), "chat": len(chats), "raw_text": len(raw), "segments": len(segmented),
        "length_unit": "tokens" if tokenizer is not None else "words",
        "prompt_length": _stats(series["prompt"]), "response_length": _stats(series["response"]),
        "raw_text_length": _stats(series["raw_text"]), "segments_length": _stats(series["segments"]),
        "turns_per_conversation": {str(k): v for k, v in sorted(turns.items())},
        "role_counts": dict(roles.most_common()),
    }
    return summary, series


# ------------------------------------------------------------------ plots

def _plots(summary: dict[str, Any], series: dict[str, list[int]]) -> dict[str, bytes]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit = summary["length_unit"]
    figs: dict[str, bytes] = {}

    def save(name: str, fig) -> None:
        buf = io.BytesIO()
        fig.tight_layout()
        fig.savefig(buf, format="png", dpi=90)
        plt.close(fig)
        figs[name] = buf.getvalue()

    def bars(name: str, data: dict[str, int], title: str, horizontal: bool = False) -> None:
        if not data:
            return
        fig, ax = plt.subplots(figsize=(6, max(2.5, 0.35 * len(data)) if horizontal else 3))
        labels, values = list(data), list(data.values())
        (ax.barh if horizontal else ax.bar)(labels, values, color="#4C72B0")
        ax.set_title(title)
        if horizontal:
            ax.invert_yaxis()
        save(name, fig)

    hists = [(k, v) for k, v in series.items() if v]
    if hists:
        fig, axes = plt.subplots(1, len(hists), figsize=(4.5 * len(hists), 3), squeeze=False)
        for ax, (name, values) in zip(axes[0], hists):
            ax.hist(values, bins=min(40, max(5, len(set(values)))), color="#4C72B0")
            ax.set_title(f"{name.replace('_', ' ')} length ({unit})")
            ax.set_ylabel("conversations")
        save("lengths", fig)
    bars("turns", summary["turns_per_conversation"], "assistant turns per conversation")
    bars("roles", summary["role_counts"], "messages by role")
    steps = summary.get("steps", {})
    if steps.get("validate"):
        v = steps["validate"]
        bars("rejects", {**v.get("rejected_by_reason", {}), **({"exact duplicate": v["duplicates"]} if v.get("duplicates") else {})},
             "validate: rejected / removed by reason", horizontal=True)
    if steps.get("curate"):
        bars("filters", steps["curate"].get("removed", {}), "curate: removed by step", horizontal=True)
    if steps.get("split"):
        bars("splits", steps["split"].get("sizes", {}), "split sizes")
    if steps.get("review"):
        r = steps["review"]
        bars("review", {k: r[k] for k in ("accepted", "rejected", "pending")}, "review decisions")
    return figs


# ------------------------------------------------------------------ rendering

def _rows(items: dict[str, Any]) -> list[tuple[str, Any]]:
    return [(str(k), v) for k, v in items.items()]


def _sections(summary: dict[str, Any]) -> list[tuple[str, list[tuple[str, Any]], list[dict[str, Any]]]]:
    """(title, [(label, value)], examples) for each section: the one content both renderers show."""
    unit = summary["length_unit"]
    out = [("Dataset", [("Conversations", summary["conversations"]), ("Chat conversations", summary["chat"]),
                        ("Raw-text records", summary["raw_text"]), ("Length unit", unit)], [])]
    if summary.get("segments"):
        out[0][1].insert(3, ("Segments records (template-free)", summary["segments"]))
    reading = summary.get("reading", {})
    if reading.get("rejected"):  # read in skip mode: what was left out of the numbers below
        out[0][1].extend([("Rejected on reading", reading["rejected"]), ("Rejects file", reading["rejects_file"])])
    for key, title in (("prompt_length", "Prompt length"), ("response_length", "Response length"),
                       ("raw_text_length", "Raw text length"), ("segments_length", "Segments record length")):
        if summary.get(key, {}).get("count"):
            out.append((f"{title} ({unit})", _rows(summary[key]), []))
    out.append(("Assistant turns per conversation", _rows(summary["turns_per_conversation"]), []))
    out.append(("Messages by role", _rows(summary["role_counts"]), []))
    steps = summary.get("steps", {})
    if steps.get("validate"):
        v = steps["validate"]
        rows = [("Records in", v["records_in"]), ("Kept", v["kept"]), ("Rejected", v["rejected"]),
                ("Exact duplicates removed", v["duplicates"]), ("Truncated", v.get("truncated", 0))]
        rows += [(f"Rejected: {k}", n) for k, n in v.get("rejected_by_reason", {}).items()]
        out.append(("Validation", rows, v.get("duplicate_examples", [])))
    if steps.get("curate"):
        c = steps["curate"]
        rows = [("Records in", c["records_in"]), ("Kept", c["kept"]), ("Removed", c["removed_total"])]
        rows += [(f"Removed: {k}", n) for k, n in c.get("removed", {}).items()]
        rows += [(f"PII replaced: {k}", n) for k, n in c.get("pii_replacements", {}).items()]
        examples = [ex for exs in c.get("examples", {}).values() for ex in exs]
        out.append(("Curation (duplicates, near-duplicates, filters)", rows, examples))
    if steps.get("split"):
        s = steps["split"]
        rows = [(f"Split: {k}", n) for k, n in s.get("sizes", {}).items()]
        rows += [("Seed", s.get("seed")), ("Stratified by", s.get("stratify") or "-")]
        out.append(("Splits", rows, []))
    if steps.get("review"):
        r = steps["review"]
        rows = [("Examples", r["total"]), ("Reviewed", r["reviewed"]), ("Accepted", r["accepted"]),
                ("Rejected", r["rejected"]), ("Pending", r["pending"]), ("Edited", r["edited"]),
                ("Labelled", r["labelled"]), ("Model suggestions", r["suggested"])]
        if r.get("suggestion_score_agreement") is not None:
            rows.append(("Suggested score = person's score", r["suggestion_score_agreement"]))
        rows += [(f"Label: {k}", n) for k, n in r.get("labels", {}).items()]
        rows += [(f"Score {k}", n) for k, n in r.get("scores", {}).items()]
        rows += [(f"Rejected: {k}", n) for k, n in r.get("reject_reasons", {}).items()]
        if r.get("decisions_not_in_data"):
            rows.append(("Logged examples no longer in the data", r["decisions_not_in_data"]))
        out.append(("Review", rows, []))
    return out


def _markdown(summary: dict[str, Any], plots: dict[str, str]) -> str:
    lines = [f"# Data report: {summary['dataset']}", ""]
    for title, rows, examples in _sections(summary):
        lines += [f"## {title}", "", "| | |", "|---|---|"]
        lines += [f"| {label} | {value} |" for label, value in rows]
        for ex in examples:
            lines.append(f"\n- `{ex.get('source')}` ({ex.get('reason', 'exact duplicate')})"
                         + (f", duplicate of `{ex['duplicate_of']}`" if ex.get("duplicate_of") else "")
                         + (f": {ex['text']}" if ex.get("text") else ""))
        lines.append("")
    lines += [f"![{name}]({path})" for name, path in plots.items()]
    return "\n".join(lines) + "\n"


def _html(summary: dict[str, Any], plots: dict[str, bytes]) -> str:
    """templates/data_report.html.jinja, with autoescaping: the data's text is shown, never run."""
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(loader=PackageLoader("sftlab.data", "templates"), autoescape=True, undefined=StrictUndefined)
    encoded = {name: base64.b64encode(png).decode("ascii") for name, png in plots.items()}
    return env.get_template("data_report.html.jinja").render(dataset=summary["dataset"], sections=_sections(summary),
                                                              plots=encoded)


def find_summaries(data: str | Path) -> dict[str, Path]:
    """Summaries written next to `data` by earlier steps: X.validate.json, X.curate.json,
    X.review.json (a review export), split.json."""
    p = Path(data)
    found = {name: p.with_suffix(f".{name}.json") for name in ("validate", "curate", "review")}
    found["split"] = p.parent / "split.json"
    return {k: v for k, v in found.items() if v.is_file()}


def _review_stats(data: str | Path, convs: list[Conversation], review_dir: str | Path | None = None
                  ) -> dict[str, Any] | None:
    """Statistics of the review log (`sftlab data review`) in `review_dir`, by default the one
    beside `data`, if there is one; read without writing anything."""
    from sftlab.data.review.log import ReviewLog
    from sftlab.data.review.session import LOG_NAME, review_dir_for, review_stats

    path = Path(review_dir or review_dir_for(data)) / LOG_NAME
    if not path.is_file():
        if review_dir is not None:
            raise SftlabError(f"{review_dir}: no review log ({LOG_NAME}) there")
        return None
    return review_stats(convs, ReviewLog(path, read_only=True))


def write_report(data: str | Path | Reading, out_dir: str | Path, *, tokenizer=None,
                 summaries: dict[str, Path] | None = None, format: str | None = None,
                 review_dir: str | Path | None = None) -> dict[str, Any]:
    """Write report.html, report.md, summary.json and plots/*.png into `out_dir`; return the summary.
    `data`: a dataset path, read strictly, or a Reading (e.g. in skip mode: its counts go in `reading`).
    `review_dir`: the review folder, when `sftlab data review --review-dir` moved it."""
    out = Path(out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    reading = as_reading(data, format)
    data = reading.path
    convs = reading.load()
    summary, series = dataset_summary(convs, tokenizer)
    summary = {"dataset": data, **summary, "reading": reading.to_json(), "steps": {}}
    for name, path in {**find_summaries(data), **(summaries or {})}.items():
        summary["steps"][name] = json.loads(Path(path).read_text(encoding="utf-8"))
    if review_dir is not None or "review" not in summary["steps"]:  # a log named outright comes first
        if (stats := _review_stats(data, convs, review_dir)) is not None:
            summary["steps"]["review"] = stats
    plots = _plots(summary, series)
    for name, png in plots.items():
        (out / "plots" / f"{name}.png").write_bytes(png)
    write_json(out / "summary.json", summary)
    atomic_write(out / "report.md", _markdown(summary, {n: f"plots/{n}.png" for n in plots}))
    atomic_write(out / "report.html", _html(summary, plots))
    return summary
