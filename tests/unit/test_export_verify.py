"""An export is verified only by measured figures within their bounds: measuring nothing, a
missing bound or a NaN is a failure, not a pass."""

from __future__ import annotations

import math

from sftlab.export.verify import Check, VerifyResult


def test_nothing_measured_is_not_verified():
    r = VerifyResult("onnx int4", "out")  # what an int4 export used to return: no tolerance, no tokens
    assert not r.ok and "nothing was measured" in "\n".join(r.lines())
    unbounded = VerifyResult("onnx fp16", "out", max_abs_diff=0.5, prompts=4)  # a figure without a bound
    assert not unbounded.ok and "(no bound)" in "\n".join(unbounded.lines())


def test_each_bound_can_fail_and_the_figures_are_printed():
    nll = Check("NLL increase", 0.12, 0.5)
    top1 = Check("top-1 agreement", 0.61, 0.45, at_least=True)
    assert VerifyResult("onnx int4", "out", checks=[nll, top1]).ok
    for bad in (Check("NLL increase", 0.9, 0.5), Check("top-1 agreement", 0.3, 0.45, at_least=True),
                Check("NLL increase", math.nan, 0.5)):
        r = VerifyResult("onnx int4", "out", checks=[top1, bad])
        text = "\n".join(r.lines())
        assert not r.ok and "OUT OF BOUNDS" in text and "VERIFICATION FAILED" in text
    fp32 = VerifyResult("onnx fp32", "out", max_abs_diff=2e-3, tolerance=1e-3, tokens_equal=True, prompts=5)
    assert not fp32.ok and "0.002 (bound <= 0.001) OUT OF BOUNDS" in "\n".join(fp32.lines())
    assert not VerifyResult("onnx fp32", "out", max_abs_diff=1e-4, tolerance=1e-3, tokens_equal=False).ok
    assert VerifyResult("onnx fp32", "out", max_abs_diff=1e-4, tolerance=1e-3, tokens_equal=True).to_dict()["ok"]


def test_verification_prompts_fit_a_template_that_refuses_system_messages(tokenizer):
    """Mistral Instruct v0.1/v0.2 templates raise on a system message: the verification prompt
    that has one is given with the system prompt at the head of the user message instead."""
    import copy
    from pathlib import Path

    import pytest

    from sftlab.errors import SftlabError
    from sftlab.export.verify import PROMPTS, prompt_ids

    tok = copy.deepcopy(tokenizer)
    tok.chat_template = (Path(__file__).parents[1] / "fixtures" / "templates" / "mistral.jinja").read_text()
    ids = prompt_ids(tok)
    assert len(ids) == len(PROMPTS)
    text = tok.decode(ids[1])
    assert "You are a concise assistant.\n\nExplain in one sentence" in text
    tok.chat_template = "{{ raise_exception('no prompts here') }}"
    with pytest.raises(SftlabError, match="the chat template refuses the verification prompt.*no prompts here"):
        prompt_ids(tok)
