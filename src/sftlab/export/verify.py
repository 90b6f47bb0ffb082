"""What every export checks against PyTorch: logits on a few chat prompts, and greedy tokens."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

PROMPTS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are a concise assistant."},
     {"role": "user", "content": "Explain in one sentence why the sky is blue."}],
    [{"role": "user", "content": "Write a haiku about autumn leaves."}],
    [{"role": "user", "content": "List three prime numbers."},
     {"role": "assistant", "content": "2, 3 and 5."},
     {"role": "user", "content": "And the next one?"}],
]


@dataclass
class VerifyResult:
    """The outcome of an export's self-check; `ok` is False when a bound was missed."""

    target: str
    out_dir: str
    max_abs_diff: float | None = None
    tolerance: float | None = None
    tokens_equal: bool | None = None
    prompts: int = 0
    metrics: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        diff_ok = self.tolerance is None or (self.max_abs_diff is not None and self.max_abs_diff <= self.tolerance)
        return diff_ok and self.tokens_equal is not False

    def lines(self) -> list[str]:
        out = [f"{self.target} export -> {self.out_dir}"]
        if self.max_abs_diff is not None:
            bound = f" (bound {self.tolerance:g})" if self.tolerance is not None else ""
            out.append(f"  logits vs PyTorch: max abs diff {self.max_abs_diff:.3g} on {self.prompts} prompts{bound}")
        if self.tokens_equal is not None:
            out.append(f"  greedy tokens identical to PyTorch: {'yes' if self.tokens_equal else 'NO'}")
        for k, v in self.metrics.items():
            out.append(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}")
        out.append("  verified" if self.ok else "  VERIFICATION FAILED")
        return out

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def prompt_ids(tokenizer) -> list[list[int]]:
    from sftlab.serve.generation import encode

    if not getattr(tokenizer, "chat_template", None):
        return [encode(tokenizer, prompt=m[-1]["content"]) for m in PROMPTS]
    return [encode(tokenizer, messages=m) for m in PROMPTS]


def torch_logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        return model(input_ids=torch.tensor([ids])).logits[0].float().numpy()


def torch_greedy(model, ids: list[int], stop_ids: list[int], max_new_tokens: int) -> list[int]:
    """Reference greedy continuation from transformers' own `generate`, stop token excluded."""
    import torch

    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                             pad_token_id=stop_ids[0])[0, len(ids):].tolist()
    return out[: next((i for i, t in enumerate(out) if t in stop_ids), len(out))]


def mean_nll(logits: np.ndarray, ids: list[int]) -> float:
    """Mean next-token negative log-likelihood of `ids` under `logits` (one row per position)."""
    x = logits[:-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].mean())
