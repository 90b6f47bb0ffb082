"""Deterministic tool-calling demo data: three functions (weather, currency conversion, local time),
requests that need one of them, the call with its arguments, the function's result and the
answer built from it. Records are OpenAI messages with `tools`; the test split holds each request
twice: cut after the call (`task: call`, exact match on the call as the template writes it) and
whole (`task: answer`, the answer given the result).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from sftlab.demo.dataset import CITIES

TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Current weather in a city",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string"}, "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"]}}},
    {"type": "function", "function": {
        "name": "convert_currency", "description": "Convert an amount of money between currencies",
        "parameters": {"type": "object", "properties": {
            "amount": {"type": "number"}, "source": {"type": "string"}, "target": {"type": "string"}},
            "required": ["amount", "source", "target"]}}},
    {"type": "function", "function": {
        "name": "get_time", "description": "Local time in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
]
CURRENCIES = {"USD": 1.0, "EUR": 0.92, "GBP": 0.79, "JPY": 151.0, "BRL": 5.0, "INR": 83.0, "CHF": 0.9}
SKIES = ["sunny", "cloudy", "rainy", "windy", "foggy", "snowing"]


def _weather(rng: random.Random) -> tuple[str, dict, dict, str]:
    city = rng.choice(CITIES)
    unit = rng.choice(["celsius", "fahrenheit"])
    ask = rng.choice(["What is the weather in {c}?", "How warm is it in {c} right now?", "Weather report for {c}, please.",
                      "Is it nice out in {c} today?"]).format(c=city)
    if unit == "fahrenheit":
        ask += " Give me Fahrenheit."
    temp, sky = rng.randint(-5, 35), rng.choice(SKIES)
    temp = round(temp * 9 / 5 + 32) if unit == "fahrenheit" else temp
    symbol = "°F" if unit == "fahrenheit" else "°C"
    return (ask, {"city": city, "unit": unit}, {"temperature": temp, "unit": unit, "sky": sky},
            f"It is {temp} {symbol} and {sky} in {city}.")


def _currency(rng: random.Random) -> tuple[str, dict, dict, str]:
    source, target = rng.sample(sorted(CURRENCIES), 2)
    amount = rng.choice([5, 10, 20, 50, 75, 100, 250, 1000])
    ask = rng.choice(["How much is {a} {s} in {t}?", "Convert {a} {s} to {t}.", "What do {a} {s} come to in {t}?"]
                     ).format(a=amount, s=source, t=target)
    value = round(amount * CURRENCIES[target] / CURRENCIES[source], 2)
    return (ask, {"amount": amount, "source": source, "target": target}, {"result": value, "currency": target},
            f"{amount} {source} is {value} {target}.")


def _time(rng: random.Random) -> tuple[str, dict, dict, str]:
    city = rng.choice(CITIES)
    ask = rng.choice(["What time is it in {c}?", "Tell me the local time in {c}.", "Is it late in {c} now?"]).format(c=city)
    clock = f"{rng.randint(0, 23):02d}:{rng.choice([0, 15, 30, 45]):02d}"
    return ask, {"city": city}, {"time": clock}, f"It is {clock} in {city}."


FUNCTIONS = {"get_weather": _weather, "convert_currency": _currency, "get_time": _time}


def _conversation(rng: random.Random, k: int) -> list[dict]:
    name = rng.choice(sorted(FUNCTIONS))
    ask, arguments, result, answer = FUNCTIONS[name](rng)
    call = {"id": f"call_{k}", "type": "function", "function": {"name": name, "arguments": json.dumps(arguments)}}
    return [{"role": "user", "content": ask}, {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"call_{k}", "content": json.dumps(result)},
            {"role": "assistant", "content": answer}]


def write_tool_demo(out_dir: str | Path, seed: int = 0, train: int = 240, test: int = 30) -> dict[str, Path]:
    """tools.train.jsonl (whole conversations) and tools.test.jsonl (each request cut after the call,
    then whole); requests are unique across the two."""
    rng, seen, rows = random.Random(seed), set(), []
    while len(rows) < train + test:
        messages = _conversation(rng, len(rows))
        key = json.dumps([messages[0]["content"], messages[1]["tool_calls"][0]["function"]])  # the request and its call
        if key not in seen:
            seen.add(key)
            rows.append(messages)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = {"train": [{"tools": TOOLS, "messages": m} for m in rows[:train]],
              "test": [{"task": task, "tools": TOOLS, "messages": m[:2] if task == "call" else m}
                       for m in rows[train:] for task in ("call", "answer")]}
    paths = {}
    for split, records in splits.items():
        paths[split] = out_dir / f"tools.{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return paths
