"""Terminal chat: the model's chat template, history, streamed replies."""

from __future__ import annotations

import sys
import threading
from typing import Callable

HELP = "Type a message. /reset clears the history, /exit quits."


class ChatSession:
    """A conversation with a model; `reply` streams the answer piece by piece to `emit`."""

    def __init__(self, model, tokenizer, *, system: str | None = None, max_tokens: int = 256,
                 temperature: float = 0.0):
        from sftlab.serve.generation import stop_token_ids

        self.model, self.tokenizer = model, tokenizer
        self.system, self.max_tokens, self.temperature = system, max_tokens, temperature
        self.stops = stop_token_ids(tokenizer, model.generation_config.eos_token_id)
        self.reset()

    def reset(self) -> None:
        self.history = [{"role": "system", "content": self.system}] if self.system else []

    def reply(self, text: str, emit: Callable[[str], None]) -> str:
        from transformers import TextIteratorStreamer

        from sftlab.serve.generation import encode

        self.history.append({"role": "user", "content": text})
        ids = encode(self.tokenizer, messages=self.history)
        import torch

        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True)
        sampling = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {"do_sample": False}
        kwargs = dict(input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                      max_new_tokens=self.max_tokens, eos_token_id=self.stops, pad_token_id=self.stops[0],
                      streamer=streamer, **sampling)
        worker = threading.Thread(target=self.model.generate, kwargs=kwargs, daemon=True)
        worker.start()
        parts = []
        for piece in streamer:
            parts.append(piece)
            emit(piece)
        worker.join()
        answer = "".join(parts).strip()
        self.history.append({"role": "assistant", "content": answer})
        return answer


def chat_loop(source: str, *, system: str | None = None, max_tokens: int = 256, temperature: float = 0.0,
              read: Callable[[str], str] = input) -> None:
    from sftlab.models import load_model, load_tokenizer

    tokenizer = load_tokenizer(source)
    model = load_model(source)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    session = ChatSession(model.eval(), tokenizer, system=system, max_tokens=max_tokens, temperature=temperature)
    print(HELP)
    while True:
        try:
            text = read("you> ").strip()
        except EOFError:
            print()
            return
        if not text:
            continue
        if text == "/exit":
            return
        if text == "/reset":
            session.reset()
            print("(history cleared)")
            continue
        print("assistant> ", end="", flush=True)
        session.reply(text, lambda s: (sys.stdout.write(s), sys.stdout.flush()))
        print()
