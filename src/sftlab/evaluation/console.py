"""Rich tables of evaluation results for the terminal (eval, compare, quickstart)."""

from __future__ import annotations

from typing import Any

from sftlab.evaluation.report import cut_off_warning, fmt, fmt_delta


def results_table(metrics: dict[str, dict[str, float]], by_group: dict[str, dict[str, dict[str, float]]] | None = None,
                  title: str = "Evaluation"):
    """One column per model; overall metrics first, then each group's (`group / metric`)."""
    from rich.table import Table

    names = list(metrics)
    table = Table(title=title)
    table.add_column("metric")
    for name in names:
        table.add_column(name, justify="right")
    for k in dict.fromkeys(k for n in names for k in metrics[n]):
        table.add_row(k, *[fmt(metrics[n].get(k)) for n in names])
    groups = list(dict.fromkeys(g for n in names for g in (by_group or {}).get(n, {})))
    for g in groups:
        table.add_section()
        keys = dict.fromkeys(k for n in names for k in by_group[n].get(g, {}))
        for k in keys:
            table.add_row(f"{g} / {k}", *[fmt(by_group[n].get(g, {}).get(k)) for n in names])
    return table


def print_eval(results: dict[str, Any], console=None, title: str = "Evaluation") -> None:
    """Print EvalResults (name -> result) side by side."""
    from rich.console import Console

    console = console or Console()
    console.print(results_table({n: r.metrics for n, r in results.items()},
                                {n: r.by_group for n, r in results.items()}, title))
    for n, r in results.items():
        _warn(console, cut_off_warning(n, r.cut_off, len(r.records), r.settings.get("max_new_tokens")))


def _warn(console, line: str | None) -> None:
    from rich.markup import escape

    if line:
        console.print(f"[yellow]warning:[/] {escape(line)}", highlight=False)


def print_compare(data: dict[str, Any], console=None) -> None:
    """The overall metric table of a comparison with deltas and confidence intervals."""
    from rich.console import Console
    from rich.table import Table

    base, models = data["base"], list(data["models"])
    tuned = [m for m in models if m != base]
    table = Table(title=f"Compared with {base} ({data['n']} examples, 95% bootstrap CI)")
    table.add_column("metric")
    for m in models:
        table.add_column(m, justify="right")
    for m in tuned:
        table.add_column(f"Δ {m}", justify="right")
    for k in data["models"][base]["metrics"]:
        table.add_row(k, *[fmt(data["models"][m]["metrics"].get(k)) for m in models],
                      *[fmt_delta(data["deltas"][m][k]) if k in data["deltas"][m] else "" for m in tuned])
    console = console or Console()
    console.print(table)
    for m in models:
        info = data["models"][m]
        _warn(console, cut_off_warning(m, info.get("cut_off", 0), data["n"], info.get("max_new_tokens")))


def print_bias(bias: dict[str, Any], console=None) -> None:
    """Bias probe summaries (name -> BiasResult's JSON form) side by side, by category."""
    from rich.console import Console

    metrics = {n: b["overall"] for n, b in bias.items()}
    by_group = {n: b["by_category"] for n, b in bias.items()}
    (console or Console()).print(results_table(metrics, by_group, "Bias probes (0 = no change across variants)"))
