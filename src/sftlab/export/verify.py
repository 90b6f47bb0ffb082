"""What every export checks against PyTorch: logits on a few chat prompts, greedy tokens, and
(for lossy precisions) the NLL of a fixed text and the top-1 agreement, each with a bound."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from sftlab.errors import SftlabError

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
class Check:
    """One measured figure and the bound it must meet (`at_least`: a floor, else a ceiling)."""

    name: str
    value: float
    bound: float
    at_least: bool = False

    @property
    def ok(self) -> bool:
        if not np.isfinite(self.value):
            return False
        return self.value >= self.bound if self.at_least else self.value <= self.bound

    def line(self) -> str:
        sign = ">=" if self.at_least else "<="
        return f"  {self.name}: {self.value:.4g} (bound {sign} {self.bound:g}) {'ok' if self.ok else 'OUT OF BOUNDS'}"


@dataclass
class VerifyResult:
    """The outcome of an export's self-check. `ok` needs at least one check and every check
    within its bound: an export that measured nothing is not verified.

    `max_abs_diff` with `tolerance` and `tokens_equal` become checks; `metrics` are reported only."""

    target: str
    out_dir: str
    max_abs_diff: float | None = None
    tolerance: float | None = None
    tokens_equal: bool | None = None
    prompts: int = 0
    metrics: dict = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)

    def all_checks(self) -> list[Check]:
        out = []
        if self.max_abs_diff is not None and self.tolerance is not None:
            out.append(Check(f"logits vs PyTorch, max abs diff on {self.prompts} prompts", self.max_abs_diff,
                             self.tolerance))
        if self.tokens_equal is not None:
            out.append(Check("greedy tokens identical to PyTorch (1 = yes)", float(self.tokens_equal), 1.0,
                             at_least=True))
        return out + self.checks

    @property
    def ok(self) -> bool:
        checks = self.all_checks()
        return bool(checks) and all(c.ok for c in checks)

    def lines(self) -> list[str]:
        out = [f"{self.target} export -> {self.out_dir}"]
        if self.max_abs_diff is not None and self.tolerance is None:
            out.append(f"  logits vs PyTorch: max abs diff {self.max_abs_diff:.3g} on {self.prompts} prompts (no bound)")
        out += [c.line() for c in self.all_checks()]
        for k, v in self.metrics.items():
            out.append(f"  {k}: {v:.4g}" if isinstance(v, float) else f"  {k}: {v}")
        if not self.all_checks():
            out.append("  nothing was measured")
        out.append("  verified" if self.ok else "  VERIFICATION FAILED")
        return out

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


# A fixed English passage: the NLL of an export (lossy precisions) is measured on it.
FIXED_TEXT = (
    "The river rises in the hills to the north of the town and runs south through farmland for about forty "
    "kilometres before it reaches the sea. In spring, when the snow melts, the water is high and fast, and the "
    "old stone bridge near the market is sometimes closed for a few days. Most of the year, however, the river is "
    "calm, and people walk along its banks in the evening. The town grew up around a mill that was built there "
    "in the twelfth century; the mill is now a small museum that explains how grain was ground into flour."
)


def declared_eos(config, generation_eos=None) -> list[int]:
    """Every EOS id a model declares: its config's (the text config's, for a multimodal one) and its
    generation_config's, which may be a list the config does not hold (Qwen3-4B-Instruct-2507: config
    151645, generation_config [151645, 151643]; Gemma 3: [1, 106]). transformers' generate stops on the
    latter, so an export that read the config alone generated past a reply the run itself ended."""
    ids: list[int] = []
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    for value in (getattr(text, "eos_token_id", None), generation_eos):
        for tok in value if isinstance(value, (list, tuple)) else [value]:
            if tok is not None and int(tok) not in ids:
                ids.append(int(tok))
    return ids


def saved_eos(hf_dir) -> list[int]:
    """`declared_eos` of a saved transformers folder (config.json and, if there, generation_config.json)."""
    from transformers import AutoConfig, GenerationConfig

    try:
        generation = GenerationConfig.from_pretrained(hf_dir).eos_token_id
    except OSError:  # no generation_config.json
        generation = None
    return declared_eos(AutoConfig.from_pretrained(hf_dir), generation)


def prompt_ids(tokenizer) -> list[list[int]]:
    from sftlab.serve.generation import encode

    if not getattr(tokenizer, "chat_template", None):
        return [encode(tokenizer, prompt=m[-1]["content"]) for m in PROMPTS]
    return [_chat_ids(tokenizer, m) for m in PROMPTS]


def _chat_ids(tokenizer, messages: list[dict]) -> list[int]:
    """A prompt through the chat template. A template that refuses a system message (Mistral
    Instruct v0.1/v0.2 raise on one) gets the system prompt at the head of the first user
    message, as such models are prompted."""
    from jinja2 import TemplateError

    from sftlab.serve.generation import encode

    try:
        return encode(tokenizer, messages=messages)
    except TemplateError as e:
        refused = e
    if messages[0]["role"] == "system":
        folded = [{"role": "user", "content": f"{messages[0]['content']}\n\n{messages[1]['content']}"}, *messages[2:]]
        try:
            return encode(tokenizer, messages=folded)
        except TemplateError as e:
            refused = e
    raise SftlabError(f"the chat template refuses the verification prompt {[m['role'] for m in messages]}: {refused}")


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


def top1_agreement(ref: np.ndarray, got: np.ndarray) -> float:
    """Share of positions where both logits pick the same next token (teacher-forced)."""
    return float((ref.argmax(-1) == got.argmax(-1)).mean())


def mean_nll(logits: np.ndarray, ids: list[int]) -> float:
    """Mean next-token negative log-likelihood of `ids` under `logits` (one row per position)."""
    x = logits[:-1].astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    logp = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


@dataclass(frozen=True)
class LogitComparison:
    """An export's logits against PyTorch's, teacher-forced on the verification prompts and FIXED_TEXT."""

    max_abs_diff: float
    largest_logit: float  # the reference's largest |logit|: the scale a lossy export's error grows with
    top1: float
    nll_reference: float  # mean next-token NLL of FIXED_TEXT
    nll_export: float
    text_tokens: int
    inputs: int  # prompts + the fixed text

    def checks(self, bounds: dict[str, float]) -> list[Check]:
        """The NLL and top-1 checks `bounds` asks for ('nll': largest |NLL change|, 'top1': least agreement)."""
        out = []
        if "nll" in bounds:
            out.append(Check(f"|NLL change| on a fixed text ({self.text_tokens} tokens), nats/token",
                             abs(self.nll_export - self.nll_reference), bounds["nll"]))
        if "top1" in bounds:
            out.append(Check("top-1 agreement with PyTorch (teacher-forced greedy)", self.top1, bounds["top1"],
                             at_least=True))
        return out


def compare_logits(reference, export, tokenizer) -> LogitComparison:
    """`reference` and `export`: token ids -> logits (one row per position)."""
    inputs = [*prompt_ids(tokenizer), tokenizer(FIXED_TEXT)["input_ids"]]
    pairs = [(reference(x), export(x)) for x in inputs]
    (ref_text, got_text), text_ids = pairs[-1], inputs[-1]
    return LogitComparison(
        max_abs_diff=max(float(abs(ref - got).max()) for ref, got in pairs),
        largest_logit=max(float(abs(ref).max()) for ref, _ in pairs),
        top1=top1_agreement(np.concatenate([r for r, _ in pairs]), np.concatenate([g for _, g in pairs])),
        nll_reference=mean_nll(ref_text, text_ids), nll_export=mean_nll(got_text, text_ids),
        text_tokens=len(text_ids), inputs=len(inputs))


def verify_saved(source: str, saved_dir, target: str = "model", tolerance: float = 1e-4) -> VerifyResult:
    """A written model folder, reloaded by plain transformers, against SOURCE as sftlab loads it
    (a GGUF is dequantised and converted, an HF folder copied: both must give the same logits)."""
    import torch
    from transformers import AutoTokenizer

    from sftlab.models import auto_model_from, load_model

    tokenizer = AutoTokenizer.from_pretrained(saved_dir)
    ref = load_model(source, dtype="float32").eval()
    got = auto_model_from(saved_dir, dtype=torch.float32).eval()
    ids = prompt_ids(tokenizer)
    diff = max(float(abs(torch_logits(ref, x) - torch_logits(got, x)).max()) for x in ids)
    return VerifyResult(target, str(saved_dir), max_abs_diff=diff, tolerance=tolerance, prompts=len(ids))
