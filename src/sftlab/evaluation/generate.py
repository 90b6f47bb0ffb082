"""Batched generation from chat prompts: left padding, KV cache, stop at end-of-turn.

Prompts are sorted by length so a batch holds prompts of similar size (little padding),
and the answers are returned in the caller's order.
"""

from __future__ import annotations

from typing import Any

from sftlab.data.tools import as_template_takes
from sftlab.serve.generation import stop_token_ids


def prompt_ids(tokenizer, messages: list[dict], source: str, tools: list[dict] | None = None) -> list[int]:
    """The prompt's token ids with the generation prompt (and the functions it may call, if any)."""
    from sftlab.data.render import template_name
    from sftlab.errors import DataError

    try:
        out = tokenizer.apply_chat_template(as_template_takes(tokenizer, messages), tools=tools,
                                            add_generation_prompt=True, tokenize=True)
    except Exception as e:  # jinja errors, raise_exception() in templates, no template at all
        raise DataError(source, f"chat template of '{template_name(tokenizer)}' failed: {e}") from e
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def context_length(model) -> int | None:
    """The longest sequence the model takes (its config's max_position_embeddings), if it says."""
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def check_fits(model, tokens: int, source: str, what: str, new_tokens: int = 0) -> None:
    """Refuse a sequence longer than the model's context: it would be scored out of range, and its
    attention mask alone can take more memory than the machine has."""
    limit = context_length(model)
    if limit and tokens + new_tokens > limit:
        from sftlab.errors import DataError

        plus = f" + {new_tokens} new tokens" if new_tokens else ""
        raise DataError(source, f"{what} is {tokens} tokens{plus}, longer than the model's context of {limit} "
                                "(max_position_embeddings): shorten it or leave it out")


# generation_config knobs that change which tokens are picked, at the values that turn them off
NEUTRAL_DECODING = {
    "top_k": None, "min_p": None, "typical_p": None, "epsilon_cutoff": None, "eta_cutoff": None,
    "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "sequence_bias": None, "suppress_tokens": None,
    "begin_suppress_tokens": None, "min_length": 0, "min_new_tokens": None, "num_beams": 1, "num_beam_groups": 1,
    "diversity_penalty": 0.0, "penalty_alpha": None, "length_penalty": 1.0, "exponential_decay_length_penalty": None,
    "forced_bos_token_id": None, "forced_eos_token_id": None, "renormalize_logits": False, "guidance_scale": None,
}


def cut_at_stop(ids: list[int], stops: set[int]) -> list[int]:
    for i, t in enumerate(ids):
        if t in stops:
            return ids[:i]
    return ids


def cut_off(ids: list[int], max_new_tokens: int) -> bool:
    """Whether a reply from `generate_ids` stopped at `max_new_tokens`, not at a stop token: its ids end
    before the stop token, so a reply that reached one is shorter than the limit."""
    return len(ids) >= max_new_tokens


def generate_batch(model, tokenizer, prompts: list[list[dict]], **options) -> list[str]:
    """Answer each chat prompt (a list of messages) with the model; answers in input order, without the
    reasoning a model writes before its answer in its template's layout (serve/reasoning.py).
    `options` as for `generate_ids`."""
    return answers(tokenizer, generate_ids(model, tokenizer, prompts, **options), prompts, options.get("tools"))


def answers(tokenizer, ids: list[list[int]], prompts: list[list[dict]],
            tools: list[list[dict] | None] | None = None) -> list[str]:
    """Generated ids decoded, each without the reasoning its template's layout puts before the answer in a
    reply to its prompt (`prompts` and `tools` as `generate_ids` took them)."""
    from sftlab.serve.generation import decode_reply
    from sftlab.serve.reasoning import reply_layout

    return [reply_layout(tokenizer, p, t).split(decode_reply(tokenizer, x))[1].strip()
            for x, p, t in zip(ids, prompts, tools or [None] * len(prompts), strict=True)]


def generate_ids(
    model,
    tokenizer,
    prompts: list[list[dict]],
    *,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_p: float = 1.0,
    progress: bool = True,
    sources: list[str] | None = None,
    tools: list[list[dict] | None] | None = None,
) -> list[list[int]]:
    """The new token ids for each prompt, cut before the first stop token, in input order.
    `sources` name the prompts in errors (e.g. one longer than the model's context); `tools` are
    each prompt's functions to call (tool-calling data)."""
    import torch
    from tqdm.auto import tqdm

    if not prompts:
        return []
    stops = stop_token_ids(tokenizer, getattr(getattr(model, "generation_config", None), "eos_token_id", None))
    if not stops:
        from sftlab.errors import SftlabError

        raise SftlabError("the tokenizer has no EOS token and its chat template no end-of-turn token")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    encoded = []
    for i, p in enumerate(prompts):
        source = sources[i] if sources else f"prompt {i + 1}"
        encoded.append(prompt_ids(tokenizer, p, source, tools[i] if tools else None))
        check_fits(model, len(encoded[-1]), source, "the prompt", max_new_tokens)
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    answers: list[list[int]] = [[] for _ in prompts]
    device = next(model.parameters()).device
    gen_kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "eos_token_id": stops,
        "pad_token_id": pad_id,
        "use_cache": True,
    }
    # a model's generation_config may carry its own decoding knobs (Qwen2.5-Instruct: top_k 20, repetition_penalty
    # 1.05): off, so tokens are picked by these settings alone, as the server picks them
    config = getattr(model, "generation_config", None)
    gen_kwargs.update({k: v for k, v in NEUTRAL_DECODING.items() if getattr(config, k, None) not in (None, v)})
    gen_kwargs.update(temperature=temperature if do_sample else None, top_p=top_p if do_sample else None)
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(prompts), desc="generate", unit="ex", disable=not progress)
    try:
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start : start + batch_size]
                width = max(len(encoded[i]) for i in idx)
                input_ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                attention = torch.zeros((len(idx), width), dtype=torch.long)
                for row, i in enumerate(idx):  # left padding: the answer starts at the same column
                    ids = encoded[i]
                    input_ids[row, width - len(ids) :] = torch.tensor(ids)
                    attention[row, width - len(ids) :] = 1
                out = model.generate(
                    input_ids=input_ids.to(device), attention_mask=attention.to(device), **gen_kwargs
                )
                stop_set = set(stops)
                for row, i in enumerate(idx):
                    answers[i] = cut_at_stop(out[row, width:].tolist(), stop_set)
                bar.update(len(idx))
    finally:
        bar.close()
        model.train(was_training)
    return answers
