"""`sftlab train` on tool-calling data as a new user writes it (OpenAI messages with `tools` and
`tool_calls`, LLaMA-Factory's ShareGPT `function_call` turns): with a template that writes tools
every call is trained, exactly the tokens the renderer marks; with one that does not, one error."""

from __future__ import annotations

import json

from sftlab.cli import main
from sftlab.data.load import load_conversations
from sftlab.data.render import render_many
from sftlab.models import load_tokenizer

CITIES = ["Lima", "Oslo", "Quito", "Perth", "Dakar", "Hanoi", "Sucre", "Tunis"]


def write_tool_data(path):
    tool = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}
    lines = []
    for k, city in enumerate(CITIES):
        call = {"name": "get_weather", "arguments": json.dumps({"city": city})}
        if k % 2:  # OpenAI messages
            lines.append({"tools": [{"type": "function", "function": tool}], "messages": [
                {"role": "user", "content": f"Weather in {city}?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": f"c{k}", "type": "function", "function": call}]},
                {"role": "tool", "tool_call_id": f"c{k}", "content": f"{10 + k} C"},
                {"role": "assistant", "content": f"{10 + k} C in {city}."}]})
        else:  # ShareGPT with function_call / observation turns, tools as a JSON string
            lines.append({"tools": json.dumps([tool]), "conversations": [
                {"from": "human", "value": f"Weather in {city}?"}, {"from": "function_call", "value": json.dumps(call)},
                {"from": "observation", "value": f"{10 + k} C"}, {"from": "gpt", "value": f"{10 + k} C in {city}."}]})
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def test_tool_calling_data_trains_every_call_with_a_template_that_writes_them(tiny_model_dir, tmp_path, capsys):
    data = write_tool_data(tmp_path / "tools.jsonl")
    out = tmp_path / "run"
    assert main(["train", "-", f"model.name_or_path={tiny_model_dir}", f"data.train={data}", "model.chat_template=chatml",
                 "data.packing=false", "training.num_train_epochs=1", "training.per_device_train_batch_size=4",
                 "training.bf16=false", f"output_dir={out}"]) == 0
    info = json.loads((out / "run.json").read_text())
    tok = load_tokenizer(str(tiny_model_dir), chat_template="chatml")
    examples = render_many(load_conversations(data), tok)
    calls = [tok.decode([t for t, label in zip(e.input_ids, e.labels) if label != -100]) for e in examples]
    assert all('{"name": "get_weather", "arguments": {"city": "' in c for c in calls)
    assert info["train_data"]["examples"] == len(CITIES)
    assert info["trained_tokens_seen"] == sum(e.num_trained for e in examples) == info["train_data"]["trained_tokens"]

    # evaluated on records that end with the call: the prompt offers the tools, and the reference is
    # the call as the template writes it (what exact match compares the generated text with)
    rows = [json.loads(x) for x in data.read_text().splitlines()[:2]]
    cut = [{**r, k: r[k][:2]} for r in rows for k in ("messages", "conversations") if k in r]
    held = tmp_path / "calls.jsonl"
    held.write_text("".join(json.dumps(r) + "\n" for r in cut))
    assert main(["eval", str(out), "--data", str(held), "--max-new-tokens", "4"]) == 0
    predictions = [json.loads(x) for x in (out / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert [p["reference"] for p in predictions] == [
        f'<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "{city}"}}}}\n</tool_call>' for city in CITIES[:2]]
    assert all(p["tools"][0]["function"]["name"] == "get_weather" for p in predictions)

    # the base is asked the same prompts with --chat-template; its own template cannot write them
    assert main(["eval", str(tiny_model_dir), "--data", str(held), "--max-new-tokens", "4", "--chat-template", "chatml",
                 "--out", str(tmp_path / "base")]) == 0
    base = [json.loads(x) for x in (tmp_path / "base" / "predictions.jsonl").read_text().splitlines()]
    assert [p["reference"] for p in base] == [p["reference"] for p in predictions]
    assert main(["eval", str(tiny_model_dir), "--data", str(held), "--out", str(tmp_path / "own")]) == 1
    assert "--chat-template on the data, eval and compare commands" in capsys.readouterr().err
    assert main(["eval", str(out), "--data", str(held), "--chat-template", "chatml"]) == 1  # a run keeps its own
    assert "is a run: it is evaluated with the chat template it was trained with" in capsys.readouterr().err


def test_the_default_template_without_tool_support_is_one_error(tiny_model_dir, tmp_path, capsys):
    data = write_tool_data(tmp_path / "tools.jsonl")
    code = main(["train", "-", f"model.name_or_path={tiny_model_dir}", f"data.train={data}", "training.max_steps=1",
                 f"output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert code == 1 and "does not write the 'tools' list" in err and "model.chat_template" in err
    assert "Traceback" not in err
