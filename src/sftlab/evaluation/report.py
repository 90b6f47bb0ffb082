"""Markdown and self-contained HTML for a comparison, both rendered from compare.json's data.

The content is built once as a list of blocks (headings, paragraphs, warnings, tables,
images); each output format only renders blocks, so both always show the same numbers.
"""

from __future__ import annotations

import base64
import math
from typing import Any

from sftlab.evaluation.metrics import LOWER_IS_BETTER

Block = tuple  # ("h1"|"h2"|"h3"|"p"|"warn", text) | ("table", headers, rows) | ("img", filename, alt)


def fmt(value: Any) -> str:
    """How every number appears in the reports."""
    if value is None:
        return ""
    if isinstance(value, float) and not math.isfinite(value):
        return "n/a"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.4f}"
    return str(value)


def fmt_delta(d: dict[str, float]) -> str:
    text = f"{d['delta']:+.4f}" if math.isfinite(d["delta"]) else "n/a"
    if "low" in d:
        text += f" [{d['low']:+.4f}, {d['high']:+.4f}]"
    return text


def _verdict(key: str, d: dict[str, float]) -> str:
    if "low" not in d:
        return ""
    better = (d["high"] < 0) if key in LOWER_IS_BETTER else (d["low"] > 0)
    worse = (d["low"] > 0) if key in LOWER_IS_BETTER else (d["high"] < 0)
    return "better" if better else "worse" if worse else "no clear change"


def cut_off_warning(name: str, cut: int, n: int, max_new_tokens: Any) -> str | None:
    """The line for answers cut at max_new_tokens: scored as they stand, often wrong for that alone."""
    if not cut:
        return None
    return (f"{name}: {cut} of {n} answers reached max_new_tokens ({max_new_tokens}) before a stop token and are "
            "scored as cut ('cut_off' in predictions.jsonl): raise --max-new-tokens if answers need more room.")


def _clip(text: Any, n: int = 160) -> str:
    text = "" if text is None else str(text)
    return text if len(text) <= n else text[: n - 1] + "…"


def blocks(data: dict[str, Any], images: list[str]) -> list[Block]:
    base, models = data["base"], list(data["models"])
    tuned = [m for m in models if m != base]
    out: list[Block] = [("h1", "sftlab comparison report")]
    out.append(("p", f"{data['n']} examples. Base: {base} ({data['models'][base]['source']}). "
                     + " ".join(f"Compared: {m} ({data['models'][m]['source']})." for m in tuned)))
    for name, model in data["models"].items():
        if warning := cut_off_warning(name, model.get("cut_off", 0), data["n"], model.get("max_new_tokens")):
            out.append(("warn", warning))
    for name, run in data["runs"].items():
        if run.get("overfit_start_step") is not None:
            out.append(("warn", f"{name}: validation loss stopped improving at step {run['overfit_start_step']:g} "
                                 "and rose while training loss kept falling: overfitting started there "
                                 "(the best checkpoint is the one before it)."))

    out.append(("h2", "Metrics"))
    out.append(("p", f"Δ is model − {base}, with a paired bootstrap {int(data['settings']['confidence'] * 100)} % "
                     f"interval over {data['settings']['n_bootstrap']} resamples of the examples. "
                     "Lower is better for perplexity and loss."))
    keys = list(data["models"][base]["metrics"])
    headers = ["metric", *models, *[f"Δ {m} [95% CI]" for m in tuned], *[f"{m} vs base" for m in tuned]]
    rows = []
    for k in keys:
        row = [k, *[fmt(data["models"][m]["metrics"].get(k)) for m in models]]
        row += [fmt_delta(data["deltas"][m][k]) if k in data["deltas"][m] else "" for m in tuned]
        row += [_verdict(k, data["deltas"][m][k]) if k in data["deltas"][m] else "" for m in tuned]
        rows.append(row)
    out.append(("table", headers, rows))
    if "metrics.png" in images:
        out.append(("img", "metrics.png", "overall metrics"))

    groups = list(dict.fromkeys(g for m in models for g in data["models"][m]["by_group"]))
    if groups:
        out.append(("h2", "Per task"))
        if "tasks.png" in images:
            out.append(("img", "tasks.png", "exact match per task"))
        for g in groups:
            out.append(("h3", g))
            gkeys = list(dict.fromkeys(k for m in models for k in data["models"][m]["by_group"].get(g, {})))
            grows = [[k, *[fmt(data["models"][m]["by_group"].get(g, {}).get(k)) for m in models]] for k in gkeys]
            out.append(("table", ["metric", *models], grows))

    for m in tuned:
        ex = data["examples"][m]
        if ex["key"] is None:
            continue
        out.append(("h2", f"Examples: {m} vs {base} (by {ex['key']})"))
        for kind, title in (("now_right", "now right"), ("now_wrong", "now wrong")):
            shown = len(ex[kind])
            out.append(("h3", f"{title}: {ex[f'{kind}_count']} examples" + (f" (first {shown})" if shown else "")))
            if shown:
                out.append(("table", ["source", "prompt", "reference", base, m],
                            [[e["source"], _clip(e["prompt"]), _clip(e["reference"]), _clip(e["base"]),
                              _clip(e["tuned"])] for e in ex[kind]]))

    if data["runs"]:
        out.append(("h2", "Training curves"))
        for name, run in data["runs"].items():
            onset = run.get("overfit_start_step")
            out.append(("p", f"{name} ({run['run_dir']}): "
                             + (f"overfitting from step {onset:g}." if onset is not None else "no overfitting detected.")))
            if f"loss-{name}.png" in images:
                out.append(("img", f"loss-{name}.png", f"{name} loss curves"))
            if run.get("alignment"):
                first, last = run["alignment"]["first"], run["alignment"]["last"]
                out.append(("p", f"{name}: preference metrics on its held-out pairs, first and last evaluation "
                                 f"({_ALIGNMENT_TERMS.get(run['alignment'].get('loss'), _ALIGNMENT_TERMS['dpo'])}; "
                                 "accuracy = share of pairs whose chosen answer out-rewards the rejected one)."))
                out.append(("table", ["metric", f"step {first['step']}", f"step {last['step']}"],
                            [[k, fmt(first.get(k)), fmt(last.get(k))] for k in first if k != "step"]))

    if data["bias"]:
        bias_models = [m for m in models if m in data["bias"]]
        out.append(("h2", "Bias probes"))
        out.append(("p", "Same prompt with a demographic term swapped. logprob_gap: spread (nats) of a fixed "
                         "answer's log-probability across the variants; label_disagreement: share of probes whose "
                         "variants got different answers. 0 means the model treats every variant alike."))
        cats = list(dict.fromkeys(c for m in bias_models for c in data["bias"][m]["by_category"]))
        brows = []
        for measure in ("logprob_gap", "label_disagreement"):
            brows.append([f"all ({measure})", *[fmt(data["bias"][m]["overall"][measure]) for m in bias_models]])
            brows += [[f"{c} ({measure})", *[fmt(data["bias"][m]["by_category"].get(c, {}).get(measure))
                                               for m in bias_models]] for c in cats]
        out.append(("table", ["category (measure)", *bias_models], brows))
    return out


# what `rewards/*` and `logps/*` are, by alignment loss: ORPO has no reference and averages over tokens
_REFERENCE_TERMS = "reward = beta x log-prob ratio to the reference; logps = summed log-probabilities of an answer"
_ALIGNMENT_TERMS = {
    "dpo": _REFERENCE_TERMS,
    "kto": _REFERENCE_TERMS,
    "orpo": "reward = beta x mean per-token log-probability of an answer (ORPO has no reference); "
            "logps = mean per-token log-probabilities, not sums",
}


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def markdown(data: dict[str, Any], images: list[str]) -> str:
    lines: list[str] = []
    for b in blocks(data, images):
        kind = b[0]
        if kind in ("h1", "h2", "h3"):
            lines += ["#" * int(kind[1]) + " " + b[1], ""]
        elif kind == "p":
            lines += [b[1], ""]
        elif kind == "warn":
            lines += [f"> **Warning:** {b[1]}", ""]
        elif kind == "table":
            lines.append("| " + " | ".join(_md_cell(h) for h in b[1]) + " |")
            lines.append("|" + "---|" * len(b[1]))
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b[2]]
            lines.append("")
        elif kind == "img":
            lines += [f"![{b[2]}]({b[1]})", ""]
    return "\n".join(lines)


_CSS = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:.5em 0 1.5em;font-size:.9em}th,td{border:1px solid #ccc;padding:.3em .6em;
text-align:left;vertical-align:top}th{background:#f3f3f3}.warn{background:#fff3cd;border-left:4px solid #e0a800;
padding:.6em 1em}img{max-width:100%}"""


def html(data: dict[str, Any], images: dict[str, bytes]) -> str:
    """The same blocks through templates/compare.html.jinja (jinja2, autoescaping on)."""
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(loader=PackageLoader("sftlab.evaluation", "templates"), autoescape=True,
                      undefined=StrictUndefined)
    encoded = {name: base64.b64encode(png).decode("ascii") for name, png in images.items()}
    return env.get_template("compare.html.jinja").render(blocks=blocks(data, list(images)), images=encoded, css=_CSS)
