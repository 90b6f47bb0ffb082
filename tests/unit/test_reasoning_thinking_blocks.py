"""Templates that write an answer's reasoning only from a `{"type": "thinking"}` block of its content (Mistral's
reasoning templates, Magistral's and Ministral 3's: `[THINK]reasoning[/THINK]answer`), reproduced by a short
template written here in that layout: data with `reasoning_content` trains the reasoning and the answer as the
model writes them, and the server returns a reply's reasoning as `reasoning_content`."""

from __future__ import annotations

import copy

import pytest

from sftlab.data.formats import to_conversation
from sftlab.data.render import render
from sftlab.errors import SftlabError
from test_data_render import trained_runs
from test_real_template_quirks import installed
from test_reasoning_split_open_prompt import reasoning_and_content

THINKING_BLOCKS = (
    "{{ bos_token }}{%- for m in messages -%}"
    "{%- if m.role == 'user' -%}[INST]{{ m.content }}[/INST]"
    "{%- elif m.role == 'assistant' -%}"
    "{%- if m.content is string -%}{{ m.content }}{%- else -%}{%- for b in m.content -%}"
    "{%- if b.type == 'text' -%}{{ b.text }}{%- elif b.type == 'thinking' -%}[THINK]{{ b.thinking }}[/THINK]"
    "{%- else -%}{{ raise_exception('Only text and thinking chunks') }}{%- endif -%}{%- endfor -%}{%- endif -%}"
    "{{ eos_token }}{%- endif -%}{%- endfor -%}")
MARKERS = ["[INST]", "[/INST]", "[THINK]", "[/THINK]"]
RECORD = {"messages": [{"role": "user", "content": "2+2?"},
                       {"role": "assistant", "content": "4", "reasoning_content": "Two and two."},
                       {"role": "user", "content": "And 3+3?"},
                       {"role": "assistant", "content": "6"}]}


@pytest.fixture
def tok(tokenizer):
    return installed(tokenizer, THINKING_BLOCKS, MARKERS)


def test_the_reasoning_is_trained_in_the_thinking_block_before_the_answer(tok):
    example = render(to_conversation(copy.deepcopy(RECORD), "think.jsonl:1"), tok)
    assert [tok.decode(run) for run in trained_runs(example)] == [
        f"[THINK]Two and two.[/THINK]4{tok.eos_token}", f"6{tok.eos_token}"]


@pytest.mark.parametrize("template", [None, "{%- for m in messages -%}{{ m.role }}: {{ m.content }}\n{%- endfor -%}",
                                      "{%- for m in messages -%}{{ m.role }}: {{ m.content | tojson }}\n{%- endfor -%}"])
def test_a_template_without_reasoning_still_refuses_it(tokenizer, template):
    """SmolLM2's template fails on a list of blocks; one that writes `{{ m.content }}` as it is writes a list's
    Python repr, or with `tojson` (LFM2's) its JSON, the reasoning in it: none takes the reasoning so, and the
    record is refused as before."""
    tok = installed(tokenizer, template, []) if template else tokenizer
    with pytest.raises(SftlabError, match="does not write the reasoning"):
        render(to_conversation(copy.deepcopy(RECORD), "think.jsonl:1"), tok)


@pytest.mark.parametrize("stream", [False, True])
def test_the_server_returns_the_reasoning_apart(tok, stream):
    from conftest import client_for

    client, _ = client_for(tok, "[THINK]Three and three.[/THINK]6")
    resp = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "3+3?"}], stream=stream)
    assert reasoning_and_content(resp) == ("Three and three.", "6")
