"""Triton Python-backend model serving a fine-tuned chat model (copied to `<model>/1/model.py`).

Input `text` (BYTES): a JSON list of chat messages (rendered with the model's chat template)
or a raw prompt. Request parameters: `max_tokens`, `temperature`, `top_p`, `seed`, and those of the
engine's `supports` (`logit_bias`: a JSON object of token id to bias; `logprobs`: how many alternatives
each token's logprob comes with; `json_schema`: the text of a JSON schema the reply is constrained to, torch
engine only, which needs `llguidance`); any other is refused.
Outputs: `text` (BYTES), `finish_reason` (BYTES: "stop" or "length"), `prompt_tokens`
and `completion_tokens` (INT32), `logprobs` (BYTES: JSON `null`, or where asked a list with each
generated token's `[token, logprob, [[token, logprob], ...]]`, the alternatives best first). Requests that Triton's dynamic batcher puts together are
decoded as one batch. Needs torch + transformers (engine "torch") or onnxruntime-genai
(engine "onnx") in the Python environment Triton runs its Python models in.
"""

import json
import sys
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sftlab source exported beside this file
from sftlab.serve.generation import (SAMPLING, GenRequest, IncrementalDecoder, OnnxEngine,  # noqa: E402
                                     TorchEngine, encode, json_grammar, parse_text_input)


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in config.get("parameters", {}).items()}
        engine = OnnxEngine if params.get("engine", "torch") == "onnx" else TorchEngine
        self.engine = engine.from_pretrained(Path(__file__).resolve().parent / "weights")
        self.default_max_tokens = int(params.get("default_max_tokens", "256"))
        self.max_tokens_limit = int(params.get("max_tokens_limit", "4096"))

    def _parse(self, request):
        params = json.loads(request.parameters() or "{}")
        max_tokens = int(params.get("max_tokens", self.default_max_tokens))
        temperature = float(params.get("temperature", 0.0))
        top_p = float(params.get("top_p", 1.0))
        if not 0 < max_tokens <= self.max_tokens_limit:
            raise ValueError(f"max_tokens must be in 1..{self.max_tokens_limit}, got {max_tokens}")
        if temperature < 0 or not 0 < top_p <= 1:
            raise ValueError("temperature must be >= 0 and top_p in (0, 1]")
        seed = None if params.get("seed") is None else int(params["seed"])
        sampling = {name: params[name] for name in SAMPLING if name in params}
        if "logit_bias" in sampling:
            sampling["logit_bias"] = {int(k): float(v) for k, v in json.loads(sampling["logit_bias"]).items()}
        if any(not 0 <= tok < len(self.engine.tokenizer) for tok in sampling.get("logit_bias", ())):
            raise ValueError("logit_bias names a token id this model does not have")
        probe = GenRequest([], 1, **sampling)
        if refused := [name for name in probe.extras() if name not in self.engine.supports]:
            raise ValueError(f"{', '.join(refused)}: not supported by this Triton model ({self.engine.name} engine)")
        if probe.json_schema:
            json_grammar(probe.json_schema)  # an invalid schema fails its request alone, not the batch
        texts = pb_utils.get_input_tensor_by_name(request, "text").as_numpy().reshape(-1)
        tokenizer = self.engine.tokenizer
        return [GenRequest(encode(tokenizer, *parse_text_input(t.decode("utf-8"))), max_tokens, temperature, top_p,
                           seed=seed, **sampling) for t in texts]

    def execute(self, requests):
        responses = [None] * len(requests)
        batch, owners = [], []
        for i, request in enumerate(requests):
            try:
                items = self._parse(request)
            except Exception as e:  # one bad request must not fail the others in its batch
                responses[i] = pb_utils.InferenceResponse(error=pb_utils.TritonError(f"bad request: {e}"))
                continue
            owners.append((i, len(batch), len(items)))
            batch.extend(items)
        results = self.engine.generate(batch) if batch else []
        def decode(tokens: list[int]) -> str:  # as the OpenAI server decodes: a template's string quote kept
            decoder = IncrementalDecoder(self.engine.tokenizer)
            return "".join(decoder.add(tok) for tok in tokens)

        for i, start, n in owners:
            items, outs = batch[start:start + n], results[start:start + n]
            tensors = [
                pb_utils.Tensor("text", np.array([[decode(r.tokens).encode()] for r in outs],
                                                  dtype=np.object_)),
                pb_utils.Tensor("finish_reason", np.array([[r.finish_reason.encode()] for r in outs], dtype=np.object_)),
                pb_utils.Tensor("prompt_tokens", np.array([[len(q.ids)] for q in items], dtype=np.int32)),
                pb_utils.Tensor("completion_tokens", np.array([[len(r.tokens)] for r in outs], dtype=np.int32)),
                pb_utils.Tensor("logprobs", np.array([[json.dumps(r.logprobs if q.logprobs is not None else None).encode()]
                                                      for q, r in zip(items, outs)], dtype=np.object_)),
            ]
            responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
        return responses
