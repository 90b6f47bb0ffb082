"""Write the broken-input corpus beside this script: `python tests/data/bad/make_bad.py`.

The files are committed; this script says how each one was made (the binary and
non-UTF-8 ones cannot be written by hand) and rewrites them identically. What each file
should do in every command is in tests/e2e/test_bad_inputs.py (CASES).
"""

from __future__ import annotations

import datetime
import decimal
import io
import json
from pathlib import Path

HERE = Path(__file__).parent


def line(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


def chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


def good(n: int) -> dict:
    return {"prompt": f"What is {n} plus {n}?", "completion": f"{2 * n}."}


def jsonl(*records) -> bytes:
    return "".join((r if isinstance(r, str) else line(r)) + "\n" for r in records).encode("utf-8")


def parquet(columns: dict) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf)
    return buf.getvalue()


def good_parquet() -> bytes:
    rows = [good(n) for n in range(1, 41)]
    return parquet({"prompt": [r["prompt"] for r in rows], "completion": [r["completion"] for r in rows]})


def corrupt_pages_parquet() -> bytes:
    """Footer intact, data pages overwritten: opens, then fails while reading rows."""
    data = bytearray(good_parquet())
    data[100:160] = b"\xff" * 60
    return bytes(data)


DEEP = 100_000  # far past Python's recursion limit

FILES: dict[str, bytes] = {
    # --- files that cannot be read at all
    "empty.jsonl": b"",
    "empty.json": b"",
    "empty.csv": b"",
    "blank_lines.jsonl": b"\n   \n\t\n\n",
    "truncated.parquet": good_parquet()[:300],
    "not_parquet.parquet": b"PAR1 this is not a parquet file at all",
    "corrupt_pages.parquet": corrupt_pages_parquet(),
    "cut_array.json": ("[\n" + ",\n".join(line(good(n)) for n in range(1, 5)) + ',\n{"prompt": "What is 5 pl').encode(),
    "scalar.json": b"42\n",
    "deep_nesting.json": b"[" * DEEP + b"]" * DEEP,
    "utf16.jsonl": jsonl(good(1), good(2), good(3)).decode().encode("utf-16"),
    "utf16.json": ("[" + ",".join(line(good(n)) for n in range(1, 4)) + "]").encode("utf-16"),
    "unbalanced_quotes.csv": b'prompt,completion\nWhat is 1 plus 1?,2.\n"What is 2 plus 2?,4.\nWhat is 3 plus 3?,6.\n',
    "binary_garbage.jsonl": bytes(range(256)) * 4,
    "header_only.csv": b"prompt,completion\n",
    # --- files with some bad records among good ones (skip mode keeps every good one)
    "bad_middle.jsonl": jsonl(good(1), good(2), '{"prompt": "What is 3 plus 3?", "completion": ', good(4), good(5)),
    "deep_nesting.jsonl": jsonl(good(1)) + b'{"prompt": ' + b"[" * DEEP + b"]" * DEEP + b', "completion": "x"}\n' + jsonl(good(3)),
    "long_line.jsonl": jsonl(good(1), {"prompt": "Repeat: " + "lorem ipsum " * 50_000, "completion": "lorem ipsum."}, good(3)),
    "control_chars.jsonl": jsonl(
        good(1),
        {"prompt": "Bell \x07, escape \x1b[31m, NUL \x00, DEL \x7f, form feed \x0c.", "completion": "Noted \x00\x1b."},
        '{"prompt": "a raw tab\tand a raw newline inside a string \x01", "completion": "x"}',  # invalid JSON: raw control chars
        good(4)),
    "lone_surrogates.jsonl": jsonl(
        good(1),
        '{"prompt": "a lone high surrogate \\ud800 here", "completion": "ok"}',
        '{"prompt": "fine", "completion": "a lone low surrogate \\udfff"}',
        '{"messages": [{"role": "user", "content": "pair \\ud83d\\ude00 is fine"}, {"role": "assistant", "content": "yes \\ud83d\\ude00"}]}',
        good(5)),
    "bom.jsonl": b"\xef\xbb\xbf" + jsonl(good(1), good(2)),
    "bom.json": b"\xef\xbb\xbf" + json.dumps([good(1), good(2)]).encode(),
    "bom.csv": b"\xef\xbb\xbfprompt,completion\nWhat is 1 plus 1?,2.\nWhat is 2 plus 2?,4.\n",
    "latin1_mixed.jsonl": jsonl(good(1)) + line({"prompt": "Caf\u00e9 au lait?", "completion": "Oui."}).encode("latin-1") + b"\n"
                          + jsonl(good(3)) + b'{"prompt": "cut \xe2\x82", "completion": "x"}\n' + jsonl(good(5)),
    "latin1_mixed.csv": b"prompt,completion\nWhat is 1 plus 1?,2.\nCaf\xe9?,Oui.\nWhat is 3 plus 3?,6.\n",
    "ragged.csv": b"prompt,completion\nWhat is 1 plus 1?,2.\nonly one field\nWhat is 3 plus 3?,6.,extra\nWhat is 4 plus 4?,8.\n\n"
                  b'"multi\nline prompt",fine\n',
    "long_field.csv": b"prompt,completion\nSummarise:" + b" word" * 30_000 + b",A short summary.\nWhat is 2 plus 2?,4.\n",
    "ragged.tsv": b"prompt\tcompletion\nWhat is 1 plus 1?\t2.\nonly one field\nWhat is 3 plus 3?\t6.\n",
    "bad_message_json.csv": b'messages\n"[{""role"": ""user"", ""content"": ""hi""}, {""role"": ""assistant"", ""content"": ""hello""}]"\n'
                            b'"[{""role"": ""user"", ""content"": ""hi""},"\n'
                            b'"[{""role"": ""user"", ""content"": ""\\ud800""}, {""role"": ""assistant"", ""content"": ""a""}]"\n'
                            b'"' + b"[" * 5_000 + b"]" * 5_000 + b'"\n',
    "missing_fields.jsonl": jsonl(
        good(1), {"prompt": "no answer"}, {"completion": "no question"}, {"instruction": "alpaca without output"},
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"content": "q"}, {"role": "assistant", "content": "a"}]},
        {"conversations": [{"from": "human"}, {"from": "gpt", "value": "a"}]}, {}, good(9)),
    "wrong_types.jsonl": jsonl(
        good(1), {"prompt": 5, "completion": "x"}, {"prompt": "q", "completion": None}, {"prompt": ["a", 1], "completion": "x"},
        {"instruction": {"a": 1}, "output": "x"}, {"messages": "not a list"}, {"messages": [1, 2]},
        {"messages": [{"role": 7, "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": ["x"]}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": {"text": "q"}}, {"role": "assistant", "content": "a"}]},
        {"text": 3.5}, {"text": True}, {"prompt": "q", "completion": float("nan")}, "a string record", 17, None, [good(1)],
        {"prompt": "q", "completion": "a", "system": 12}, good(19)),
    "empty_answers.jsonl": jsonl(
        good(1), {"prompt": "q", "completion": ""}, {"prompt": "q", "completion": " \n\t "}, chat("q", ""),
        {"instruction": "say nothing", "output": ""}, {"question": "q", "answer": []}, {"text": ""}, chat("", "a"), good(9)),
    "roles_out_of_order.jsonl": jsonl(
        good(1),
        {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "tool", "content": "t"}, {"role": "assistant", "content": "a"}]},
        {"messages": [{"role": "user", "content": "q"}]},
        {"messages": []},
        {"messages": [{"role": "robot", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"conversations": [{"from": "gpt", "value": "a"}, {"from": "human", "value": "q"}]},
        good(10)),
    "mixed_schemas.jsonl": jsonl(
        good(1), {"instruction": "Say hi.", "output": "hi"}, {"unknown": "schema"}, chat("q", "a"),
        {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}, {"text": "raw text"}),
    "numbers_and_dupes.jsonl": (  # JSON that Python accepts but no strict parser does, and duplicate keys
        b'{"prompt": "What is 1 plus 1?", "completion": "2.", "score": NaN}\n'
        b'{"prompt": "What is 2 plus 2?", "completion": "4.", "score": Infinity}\n'
        b'{"prompt": "What is 3 plus 3?", "completion": "6.", "score": 1e999999}\n'
        b'{"prompt": "dup", "prompt": "What is 4 plus 4?", "completion": "8."}\n'),
    "huge_number.jsonl": jsonl(good(1)) + b'{"prompt": "q", "completion": "a", "n": ' + b"7" * 5000 + b"}\n" + jsonl(good(3)),
    "crlf_and_cr.jsonl": jsonl(good(1)).replace(b"\n", b"\r\n") + jsonl(good(2)).replace(b"\n", b"\r\n")
                         + line(good(3)).encode() + b"\r" + line(good(4)).encode() + b"\n",
    "columns_unequal.json": json.dumps({"prompt": ["a", "b", "c"], "completion": ["x", "y"]}).encode(),
    "wrong_types.parquet": parquet({"prompt": ["What is 1 plus 1?", None, "What is 3 plus 3?", "q"],
                                    "completion": ["2.", "x", None, ""]}),
    "arrow_types.parquet": parquet({  # extra columns JSON has no type for: kept in meta, written as strings
        "prompt": ["What is 1 plus 1?", "What is 2 plus 2?"], "completion": ["2.", "4."],
        "when": [datetime.datetime(2020, 1, 1), datetime.datetime(2021, 6, 1, 12)], "blob": [b"\x00\xff", b"x"],
        "price": [decimal.Decimal("1.50"), decimal.Decimal("2.00")]}),
    "nested_columns.parquet": parquet({"messages": [chat("q1", "a1")["messages"], [], chat("q3", "")["messages"],
                                                    chat("q4", "a4")["messages"]]}),
    "preference_bad.jsonl": jsonl(
        {"prompt": "What is 1 plus 1?", "chosen": "2.", "rejected": "3."},
        {"prompt": "q", "chosen": "same", "rejected": "same"},
        {"prompt": "q", "chosen": "a"},
        {"prompt": "q", "chosen": 5, "rejected": "b"},
        {"chosen": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a"}],
         "rejected": [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "b"}]},
        {"prompt": "q", "completion": "a", "label": "maybe"},
        {"prompt": "What is 2 plus 2?", "chosen": "4.", "rejected": "5."}),
    # --- templates and tokenizers
    "raising_template.jinja": (b"{%- for m in messages %}{%- if m['role'] == 'assistant' and 'forbidden' in m['content'] %}"
                               b"{{ raise_exception('assistant turns may not say forbidden') }}{%- endif %}"
                               b"<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{%- endfor %}"
                               b"{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}"),
    "forbidden_answer.jsonl": jsonl(good(1), {"prompt": "Say it.", "completion": "forbidden word"}, good(3)),
    "broken_template.jinja": b"{% for m in messages %}{{ m['content'] }",
    "sandbox_escape.jinja": b"{{ messages.__class__.__mro__[1].__subclasses__() }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
}


def main() -> None:
    for name, data in FILES.items():
        (HERE / name).write_bytes(data)
    print(f"wrote {len(FILES)} files to {HERE}")


if __name__ == "__main__":
    main()
