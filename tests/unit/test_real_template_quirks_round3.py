"""More quirks of real vendors' chat templates, each reproduced by a short template written here (no vendor's text):
an answer is trained exactly as the model generates it after the generation prompt, through the tokens that end its
turn, or the template is refused with one clear line."""

from __future__ import annotations

import copy

import pytest

from sftlab.data.formats import to_conversation
from sftlab.data.render import render
from sftlab.errors import SftlabError
from test_data_render import trained_runs
from test_real_template_quirks import MULTI, installed

# GLM-Edge's template ignores add_generation_prompt: it writes the answer header `<|assistant|>` after every
# conversation, and no end-of-turn token, so an answer is followed by the next turn's `<|user|>` or, the last one,
# by that header (sftlab trained a last answer through `<|assistant|>`, the header of the model's own next turn).
HEADER_AFTER_EVERY_CONVERSATION = ("{%- for m in messages -%}{{ '<|' + m.role + '|>\\n' + m.content }}{%- endfor -%}"
                                   "{{ '<|assistant|>' }}")
# a template that ends every conversation with its EOS instead (no generation prompt at all) opens no answer with it
EOS_AFTER_EVERY_CONVERSATION = "{%- for m in messages -%}{{ m.role + ': ' + m.content + '\\n' }}{%- endfor -%}{{ eos_token }}"


def test_a_template_that_writes_a_lone_answer_header_after_every_conversation_is_refused_in_one_line(tokenizer):
    tok = installed(tokenizer, HEADER_AFTER_EVERY_CONVERSATION, ["<|system|>", "<|user|>", "<|assistant|>"])
    with pytest.raises(SftlabError, match="writes its generation prompt after every conversation") as refused:
        render(to_conversation(copy.deepcopy(MULTI), "quirk.jsonl:1"), tok)
    assert "\n" not in str(refused.value)


@pytest.mark.filterwarnings("ignore:the chat template of .* is not prefix-stable:UserWarning")
def test_a_template_that_ends_every_conversation_with_its_eos_is_trained(tokenizer):
    tok = installed(tokenizer, EOS_AFTER_EVERY_CONVERSATION, [])
    example = render(to_conversation(copy.deepcopy(MULTI), "quirk.jsonl:1"), tok)
    eos = tok.eos_token
    assert [tok.decode(run) for run in trained_runs(example)] == [f" Hello!{eos}", f" Blue.\n{eos}"]


# EXAONE ends an answer with `[|endofturn|]`, a bracketed marker: given to a tokenizer without that token, the marker
# is split into plain pieces and the EOS lands inside it (sftlab trained "Blue.[" + EOS, without a word of warning).
BRACKETED_MARKER = ("{%- for m in messages -%}{{ '[|' + m.role + '|]' + m.content + '[|endofturn|]\\n' }}{%- endfor -%}"
                    "{%- if add_generation_prompt %}{{ '[|assistant|]' }}{%- endif -%}")


def test_a_bracketed_end_marker_that_is_not_a_token_warns(tokenizer):
    import warnings

    tok = installed(tokenizer, BRACKETED_MARKER, [])
    with pytest.warns(UserWarning, match=r"ends an answer with '\[\|endofturn\|\]', which is not a token"):
        render(to_conversation(copy.deepcopy(MULTI), "quirk.jsonl:1"), tok)

    tok = installed(tokenizer, BRACKETED_MARKER, ["[|user|]", "[|assistant|]", "[|endofturn|]"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        example = render(to_conversation(copy.deepcopy(MULTI), "quirk.jsonl:1"), tok)
    assert [tok.decode(run) for run in trained_runs(example)] == ["Hello![|endofturn|]", "Blue.[|endofturn|]"]
