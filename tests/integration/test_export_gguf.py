"""GGUF export: written with the gguf package, read back by transformers' GGUF loader within bounds.

The models use a small byte-level BPE tokenizer (400 tokens, ChatML template) trained here, so
that reading the GGUF back (transformers parses the whole vocabulary in Python) stays fast.
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import TOKENIZER_DIR
from test_deploy_export import make_lora_run


@pytest.fixture(scope="module")
def small_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    text = ["What is the capital of France? Paris is the capital.", "Explain why the sky is blue in one sentence.",
            "Write a haiku about autumn leaves.", "List three prime numbers: 2, 3 and 5. And the next one?",
            "You are a concise assistant. system user assistant"] * 20
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(text, trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                  pad_token="<|im_end|>")
    tok.chat_template = (TOKENIZER_DIR / "chat_template.jinja").read_text()
    return tok


def save_qwen2(path: Path, tokenizer) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(3)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, small_tokenizer) -> Path:
    return make_lora_run(tmp_path_factory.mktemp("gguf-run"), small_tokenizer)


@pytest.fixture(scope="module")
def f16_export(tmp_path_factory, run_dir):
    from sftlab.export.gguf import export_gguf

    out = tmp_path_factory.mktemp("gguf") / "f16"
    return out, export_gguf(str(run_dir), out, quant="f16")


def test_lora_run_exports_to_f16_within_bounds(f16_export, small_tokenizer):
    import gguf

    out, result = f16_export
    print("\n".join(result.lines()))
    assert result.ok, result.lines()
    assert result.max_abs_diff <= 2e-2 and nll_change(result) <= 1e-3
    reader = gguf.GGUFReader(out / "model.gguf")
    fields = {k: f.contents() for k, f in reader.fields.items()}
    assert fields["general.architecture"] == "llama"
    assert fields["tokenizer.chat_template"] == small_tokenizer.chat_template
    assert fields["tokenizer.ggml.eos_token_id"] == small_tokenizer.eos_token_id
    assert fields["tokenizer.ggml.model"] == "gpt2" and len(fields["tokenizer.ggml.tokens"]) == len(small_tokenizer)
    modelfile = (out / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.gguf") and 'PARAMETER stop "<|im_end|>"' in modelfile
    assert "<|im_start|>{{ .Role }}" in modelfile
    # SmolLM2's template writes a system prompt into a chat without one; the Go template would not
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in modelfile
    assert json.loads((out / "sftlab_export.json").read_text())["verification"]["ok"]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_q8_0_round_trip_within_looser_bounds(tmp_path, small_tokenizer, run_dir, arch):
    from sftlab.export.gguf import export_gguf

    source = run_dir if arch == "llama" else save_qwen2(tmp_path / "qwen2", small_tokenizer)
    result = export_gguf(str(source), tmp_path / "q8", quant="q8_0")
    print("\n".join(result.lines()))
    assert result.ok, result.lines()
    assert "Q8_0" in result.metrics["tensor types"]
    import gguf  # the types counted as they were written are the file's

    from sftlab.export.gguf import type_summary

    written = Counter(t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "q8" / "model.gguf").tensors)
    assert result.metrics["tensor types"] == type_summary(written)
    assert 0 < result.max_abs_diff <= 0.1  # quantized: not exact, but close


def nll_change(result) -> float:
    (check,) = [c for c in result.checks if c.name.startswith("|NLL change|")]
    return check.value


def corrupted_copy(gguf_path: Path, tmp_path: Path, tensor_name: str, change=lambda data: data[::-1].copy()) -> Path:
    """A copy of GGUF_PATH with one tensor changed, by default its rows in reverse order: the same
    values, still a valid file."""
    import shutil

    import gguf

    copy = tmp_path / "corrupted" / "model.gguf"
    copy.parent.mkdir()
    shutil.copy(gguf_path, copy)
    reader = gguf.GGUFReader(copy, "r+")
    tensor = next(t for t in reader.tensors if t.name == tensor_name)
    tensor.data[...] = change(tensor.data)
    reader.data.flush()
    del reader
    return copy


def verify_file(path: Path, run: Path, tmp_path: Path, quant: str):
    from transformers import AutoTokenizer

    from sftlab.export.gguf import verify_gguf
    from sftlab.export.onnx import hf_folder
    from sftlab.serve.generation import stop_token_ids

    hf_dir = hf_folder(str(run), tmp_path / "work")
    result = verify_gguf(hf_dir, path, quant, stop_token_ids(AutoTokenizer.from_pretrained(hf_dir)))
    print("\n".join(result.lines()))
    return result


def test_a_corrupted_tensor_fails_the_check(tmp_path, f16_export, run_dir):
    out, _ = f16_export
    result = verify_file(corrupted_copy(out / "model.gguf", tmp_path, "blk.1.attn_v.weight"), run_dir, tmp_path, "f16")
    assert not result.ok
    assert result.max_abs_diff > 2e-2


@pytest.fixture(scope="module")
def trained_llama(tmp_path_factory, small_tokenizer) -> Path:
    """A tiny Llama that has learnt the check prompts and the fixed text (mean NLL well under 1), so
    that a wrong weight shows in the NLL; a random model's NLL is about log(vocab) whatever its weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from sftlab.export.verify import FIXED_TEXT, prompt_ids

    ids = [*prompt_ids(small_tokenizer), small_tokenizer(FIXED_TEXT)["input_ids"]]
    width = max(map(len, ids))
    batch = torch.tensor([x + [small_tokenizer.pad_token_id] * (width - len(x)) for x in ids])
    labels = torch.tensor([x + [-100] * (width - len(x)) for x in ids])
    config = LlamaConfig(vocab_size=len(small_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=False, eos_token_id=small_tokenizer.eos_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(150):
        loss = model(input_ids=batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5
    path = tmp_path_factory.mktemp("trained") / "model"
    model.save_pretrained(path)
    small_tokenizer.save_pretrained(path)
    return path


def test_q4_0_passes_its_nll_bound_and_a_corrupted_weight_does_not(tmp_path, trained_llama):
    """q4_0 has no logit bound, only the NLL change, the top-1 agreement and the tokenizer read back:
    all must be able to pass (this was once impossible) and the NLL change must catch one tensor in
    the wrong order."""
    from sftlab.export.gguf import BOUNDS, export_gguf

    result = export_gguf(str(trained_llama), tmp_path / "q4", quant="q4_0")
    print("\n".join(result.lines()))
    assert result.ok, result.lines()
    assert "Q4_0" in result.metrics["tensor types"] and result.lines()[-1] == "  verified"
    assert 0 < nll_change(result) <= BOUNDS["q4_0"]["nll"]
    bad = verify_file(corrupted_copy(tmp_path / "q4" / "model.gguf", tmp_path, "blk.0.ffn_down.weight"),
                      trained_llama, tmp_path, "q4_0")
    assert not bad.ok and nll_change(bad) > BOUNDS["q4_0"]["nll"]
    assert "OUT OF BOUNDS" in "\n".join(bad.lines())


@pytest.mark.slow
def test_q8_0_export_of_the_embedded_model_meets_its_bounds_and_a_flipped_norm_does_not(tmp_path, monkeypatch):
    """The bounds hold on a real model's logits (SmolLM2-135M's reach 43; a tiny random model's stay
    near 0, where any bound passes): q8_0 costs something within them, and one layer norm with its
    sign flipped fails the logits, top-1 and NLL checks. The flipped model is the one read back from
    the file with that norm negated, verified by the same code (a corrupted file is read through the
    loader in the tests above; reading this one again would parse its 49k-token vocabulary 3 times)."""
    import copy

    import torch

    import sftlab.export.gguf as gguf_export
    from sftlab.models import embedded_model_dir

    read, read_back = [], gguf_export.read_back

    def recorded(path):
        read.append(read_back(path))
        return read[-1]

    monkeypatch.setattr(gguf_export, "read_back", recorded)
    src = embedded_model_dir()
    result = gguf_export.export_gguf(str(src), tmp_path / "q8", quant="q8_0")
    print("\n".join(result.lines()))
    assert result.ok, result.lines()
    assert result.metrics["largest |logit|"] > 20 and 0.1 < result.max_abs_diff <= result.tolerance
    assert 0 < nll_change(result) and result.metrics["top-1 agreement"] < 1
    (model, read_tokenizer), = read
    flipped = copy.deepcopy(model)
    with torch.no_grad():
        flipped.model.layers[10].post_attention_layernorm.weight.neg_()  # the file's blk.10.ffn_norm.weight
    monkeypatch.setattr(gguf_export, "read_back", lambda path: (flipped, read_tokenizer))
    bad = verify_file(tmp_path / "q8" / "model.gguf", src, tmp_path, "q8_0")
    assert [c.name.split(" (")[0].split(" on ")[0] for c in bad.all_checks() if not c.ok] == \
        ["logits vs PyTorch, max abs diff", "|NLL change|", "top-1 agreement with PyTorch"], bad.lines()


def test_every_quantization_has_bounds():
    from sftlab.export.gguf import BOUNDS, K_QUANTS, LOGIT_FLOOR, QUANTS

    assert set(BOUNDS) == set(QUANTS + K_QUANTS)
    assert {q for q, b in BOUNDS.items() if "logits" in b} == set(LOGIT_FLOOR)


def test_unknown_quant_and_architecture_are_clear_errors(tmp_path, small_tokenizer):
    from sftlab.errors import SftlabError
    from sftlab.export.gguf import export_gguf

    with pytest.raises(SftlabError, match="unknown GGUF quantization 'q3_x'.*llama-quantize"):
        export_gguf("default", tmp_path / "x", quant="q3_x")


def test_an_unsupported_architecture_is_refused_before_any_work(tmp_path, small_tokenizer):
    """GGUF and ONNX name the architectures they export before merging or converting anything."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from sftlab.errors import SftlabError
    from sftlab.export.gguf import export_gguf
    from sftlab.export.onnx import export_onnx

    config = AutoConfig.for_model("gpt2", vocab_size=len(small_tokenizer), n_embd=32, n_layer=1, n_head=2)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gpt2")
    small_tokenizer.save_pretrained(tmp_path / "gpt2")
    for export, what in ((export_gguf, "GGUF"), (export_onnx, "ONNX")):
        with pytest.raises(SftlabError, match=f"{what} export supports llama, .*; this model is 'gpt2'"):
            export(str(tmp_path / "gpt2"), tmp_path / what)
        assert not (tmp_path / what).exists()


def fake_quantize(bin_dir: Path, monkeypatch, exit_code: int = 0) -> Path:
    """A `llama-quantize` on PATH that records its arguments and copies the f16 file (or fails)."""
    import os

    bin_dir.mkdir()
    script = bin_dir / "llama-quantize"
    script.write_text(f"""#!{sys.executable}
import json, shutil, sys
open({str(bin_dir / "args.json")!r}, "w").write(json.dumps(sys.argv[1:]))
if {exit_code}:
    sys.exit("main: invalid quantization type")
shutil.copy(sys.argv[1], sys.argv[2])
""")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return bin_dir / "args.json"


def test_k_quants_run_llama_quantize_when_it_is_on_path(tmp_path, run_dir, monkeypatch):
    from sftlab.errors import SftlabError
    from sftlab.export.gguf import export_gguf

    monkeypatch.setenv("PATH", str(Path(sys.executable).parent))
    with pytest.raises(SftlabError, match="q4_k_m needs llama.cpp's llama-quantize on PATH"):
        export_gguf(str(run_dir), tmp_path / "none", quant="q4_k_m")

    args = fake_quantize(tmp_path / "bin", monkeypatch)
    result = export_gguf(str(run_dir), tmp_path / "k", quant="q4_k_m")
    print("\n".join(result.lines()))
    source, target, kind = json.loads(args.read_text())
    assert source.endswith("f16.gguf") and Path(target).name == "model.gguf" and kind == "Q4_K_M"
    assert result.ok and (tmp_path / "k" / "model.gguf").exists()


def test_a_failing_llama_quantize_is_a_one_line_error(tmp_path, run_dir, monkeypatch):
    from sftlab.errors import SftlabError
    from sftlab.export.gguf import export_gguf

    fake_quantize(tmp_path / "bin", monkeypatch, exit_code=1)
    with pytest.raises(SftlabError, match=r"^llama-quantize Q6_K failed \(exit 1\): main: invalid quantization type$"):
        export_gguf(str(run_dir), tmp_path / "k", quant="q6_k")
    assert not (tmp_path / "k").exists() or not any((tmp_path / "k").iterdir())


def save_tiny(path: Path, model_type: str, tokenizer) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=512, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("model_type", ["mistral", "qwen3", "phi3"])
def test_f16_round_trip_per_architecture(tmp_path, small_tokenizer, model_type):
    """Each source sits in a folder named after its architecture: a folder named "mistral" once made
    transformers read the file back as a Mistral GGUF, which it cannot load."""
    import gguf

    from sftlab.export.gguf import export_gguf

    result = export_gguf(str(save_tiny(tmp_path / model_type, model_type, small_tokenizer)), tmp_path / "out")
    print("\n".join(result.lines()))
    assert result.ok, result.lines()
    fields = {k: f.contents() for k, f in gguf.GGUFReader(tmp_path / "out" / "model.gguf").fields.items()}
    assert model_type not in fields["general.name"].lower()


def test_a_file_transformers_cannot_read_back_is_a_one_line_error(tmp_path, small_tokenizer, monkeypatch):
    """Gemma (1) is written by llama.cpp's converter but transformers' GGUF loader refuses it: a
    verification that cannot run is a one-line error, and Gemma is not offered."""
    from sftlab.errors import SftlabError
    from sftlab.export import gguf as export

    assert "gemma" not in export.ARCHS
    monkeypatch.setitem(export.ARCHS, "gemma", export.Arch("GEMMA"))
    with pytest.raises(SftlabError, match=r"^model\.gguf: transformers' GGUF loader cannot read the file back") as err:
        export.export_gguf(str(save_tiny(tmp_path / "gemma", "gemma", small_tokenizer)), tmp_path / "out")
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out" / "model.gguf").exists()


class FakeLlama:
    """llama_cpp.Llama as `llama_cpp_greedy` uses it, generating greedily with transformers from the
    same GGUF file; `wrong_at` plants a different token at that step."""

    wrong_at: int | None = None

    def __init__(self, model_path: str, **_):
        from transformers import AutoModelForCausalLM

        path = Path(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name).eval()

    def reset(self):
        pass

    def generate(self, ids, **_):
        import torch

        ids = list(ids)
        for step in range(64):  # llama.cpp's generator is endless; the caller stops it
            with torch.inference_mode():
                tok = int(self.model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            if step == self.wrong_at:
                tok = (tok + 1) % self.model.config.vocab_size
            ids.append(tok)
            yield tok


@pytest.mark.parametrize("wrong_at", [None, 2])
def test_llama_cpp_greedy_tokens_are_compared(tmp_path, f16_export, run_dir, monkeypatch, wrong_at):
    """llama-cpp-python cannot be installed here: a stand-in module checks the comparison logic."""
    import sys
    import types

    monkeypatch.setattr(FakeLlama, "wrong_at", wrong_at)
    monkeypatch.setitem(sys.modules, "llama_cpp", types.SimpleNamespace(Llama=FakeLlama))
    out, _ = f16_export
    result = verify_file(out / "model.gguf", run_dir, tmp_path, "f16")
    agreement = next(v for k, v in result.metrics.items() if k.startswith("llama.cpp greedy tokens agreeing"))
    same, total = map(int, agreement.split("/"))
    assert total > 0 and result.tokens_equal is (wrong_at is None) and result.ok is (wrong_at is None)
    assert (same == total) is (wrong_at is None)


@pytest.mark.parametrize("pre_tokenizer, name", [
    ({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}, "gpt-2"),  # SmolLM2's
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                             "use_regex": True}]}, "smollm"),
    ({"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "QWEN2"}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}]}, "qwen2"),
])
def test_the_gguf_names_the_split_llama_cpp_must_use(tmp_path, pre_tokenizer, name):
    """llama.cpp picks its split regexes by tokenizer.ggml.pre; its 'default' cuts punctuation runs and
    3-digit groups first, so naming GPT-2's byte-level split 'default' would tokenize ' {"' or ' 2019'
    otherwise than the model was trained on."""
    import shutil

    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    from sftlab.export.gguf import pre_tokenizer_name

    folder = tmp_path / "tok"
    shutil.copytree(TOKENIZER_DIR, folder)
    data = json.loads((folder / "tokenizer.json").read_text())
    data["pre_tokenizer"] = json.loads(json.dumps(pre_tokenizer).replace('"QWEN2"', json.dumps(PRETOKENIZE_REGEX)))
    (folder / "tokenizer.json").write_text(json.dumps(data))
    assert pre_tokenizer_name(folder) == name


# Architectures llama.cpp's converter writes with glue of their own (gguf_archs.py), each at the
# values transformers' GGUF loader assumes for what the file does not tell it (Gemma's
# query_pre_attn_scalar 256 = head_dim, as llama.cpp scales; the Qwen MoEs' expert widths, which
# the loader takes from its config class; Qwen3-MoE's normalized top-k, which llama.cpp applies).
# Sliding windows of 8 tokens are shorter than the check prompts, so a window that did not reach
# the file would show. LFM2 has one short-convolution layer and one attention layer.
NEW_ARCHS = {
    "gemma3_text": dict(head_dim=256, sliding_window=8, rope_theta=20000.0),
    "gemma2": dict(head_dim=256, sliding_window=8, rope_theta=20000.0),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, head_dim=16, norm_topk_prob=True),
    "qwen2_moe": dict(num_experts=4, num_experts_per_tok=2),
    "starcoder2": dict(),
    "stablelm": dict(),
    "nemotron": dict(),
    "lfm2": dict(layer_types=["conv", "full_attention"]),
}
LLAMA_CPP_ARCH = {"gemma3_text": "gemma3", "qwen3_moe": "qwen3moe", "qwen2_moe": "qwen2moe"}
# Qwen2-MoE at seed 0: f16 rounding flips one near-tied routing choice (max |Δlogit| 0.050, as the same
# rounding done in PyTorch gives: the type's cost on a random router, not the writer's)
SEEDS = {"qwen2_moe": 1}


def save_new_arch(path: Path, model_type: str, tokenizer, **overrides) -> Path:
    """A tiny random model whose norms (zero-centred for Gemma and Nemotron, which store w for 1 + w)
    and biases are random too, so that a norm or bias written wrong shows in the logits."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=512, bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  **{**NEW_ARCHS[model_type], **overrides})
    torch.manual_seed(SEEDS.get(model_type, 0))
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0 if model_type.startswith(("gemma", "nemotron")) else 1.0, 0.3)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.1)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def new_arch_dirs(tmp_path_factory, small_tokenizer) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("new-archs")
    return {mt: save_new_arch(root / mt, mt, small_tokenizer) for mt in NEW_ARCHS}


@pytest.mark.parametrize("model_type", list(NEW_ARCHS))
def test_new_architectures_round_trip_exactly_at_f32_and_within_bounds_at_f16(tmp_path, new_arch_dirs, model_type):
    import gguf

    from sftlab.export.gguf import ARCHS, export_gguf

    f32 = export_gguf(str(new_arch_dirs[model_type]), tmp_path / "f32", quant="f32")
    print("\n".join(f32.lines()))
    assert f32.ok, f32.lines()
    assert f32.max_abs_diff <= 1e-5  # the same weights: only float rounding of the norm offsets
    f16 = export_gguf(str(new_arch_dirs[model_type]), tmp_path / "f16", quant="f16")
    print("\n".join(f16.lines()))
    assert f16.ok, f16.lines()
    assert 0 < f16.max_abs_diff <= 2e-2 and nll_change(f16) <= 1e-3
    fields = {k: f.contents() for k, f in gguf.GGUFReader(tmp_path / "f16" / "model.gguf").fields.items()
              if not k.startswith("tokenizer.")}
    assert fields["general.architecture"] == LLAMA_CPP_ARCH.get(model_type, model_type)
    if ARCHS[model_type].file_keys:  # the keys only llama.cpp reads are checked, and were there to check
        assert any(c.name.startswith(f"{len(ARCHS[model_type].file_keys)} llama.cpp keys") and c.ok for c in f16.checks)


def test_the_keys_only_llama_cpp_reads_are_those_of_its_converter(tmp_path, new_arch_dirs):
    """Values written out, not read back from the config by the same table: Gemma 2's soft-caps
    (which transformers' loader never reads), Gemma 3's local rope base, the MoEs' expert widths."""
    import gguf

    from sftlab.export.gguf import write_gguf

    want = {
        "gemma2": {"gemma2.attn_logit_softcapping": 50.0, "gemma2.final_logit_softcapping": 30.0,
                   "gemma2.attention.sliding_window": 8, "gemma2.rope.freq_base": 20000.0},
        "gemma3_text": {"gemma3.rope.freq_base_swa": 10000.0, "gemma3.rope.freq_base": 20000.0,
                        "gemma3.attention.sliding_window": 8, "gemma3.final_logit_softcapping": None},
        "qwen2_moe": {"qwen2moe.expert_feed_forward_length": 1408, "qwen2moe.expert_shared_feed_forward_length": 5632,
                      "qwen2moe.expert_count": 4, "qwen2moe.expert_used_count": 2},
        "qwen3_moe": {"qwen3moe.expert_feed_forward_length": 768, "qwen3moe.expert_count": 4},
        "stablelm": {"stablelm.rope.dimension_count": 4, "stablelm.use_parallel_residual": False,
                     "stablelm.attention.layer_norm_epsilon": 1e-5},
        "nemotron": {"nemotron.rope.dimension_count": 8, "nemotron.attention.layer_norm_epsilon": 1e-5},
        "starcoder2": {"starcoder2.rope.freq_base": 10000.0, "starcoder2.attention.layer_norm_epsilon": 1e-5},
        # KV heads per layer, 0 on the convolution one; the MLP's width as transformers derives it from 128
        "lfm2": {"lfm2.attention.head_count_kv": [0, 2], "lfm2.feed_forward_length": 256, "lfm2.shortconv.l_cache": 3},
    }
    for model_type, keys in want.items():
        path = tmp_path / f"{model_type}.gguf"
        types = write_gguf(new_arch_dirs[model_type], path, "f16", [])
        reader = gguf.GGUFReader(path)
        fields = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.")}
        for key, value in keys.items():
            assert fields.get(key) == pytest.approx(value) if value is not None else key not in fields, (key, fields)
        tensors = {t.name: t for t in reader.tensors}
        if "moe" in model_type:  # experts stacked, the routers kept f32 as llama.cpp's converter keeps them
            width = 768 if model_type == "qwen3_moe" else 1408
            assert tensors["blk.0.ffn_gate_exps.weight"].shape.tolist() == [64, width, 4]
            assert tensors["blk.0.ffn_gate_inp.weight"].tensor_type.name == "F32" and types["F16"] > 0
        if model_type == "qwen2_moe":
            assert tensors["blk.0.ffn_gate_inp_shexp.weight"].shape.tolist() == [64]
        if model_type == "lfm2":
            assert tensors["blk.0.shortconv.conv.weight"].shape.tolist() == [3, 64]


def plant(monkeypatch, fault: str) -> None:
    """One piece of glue undone or done wrong."""
    import dataclasses

    import numpy as np

    from sftlab.export import gguf as export
    from sftlab.export import gguf_archs

    def replace_arch(model_type, **changes):
        monkeypatch.setitem(export.ARCHS, model_type, dataclasses.replace(export.ARCHS[model_type], **changes))

    def on_experts(change):
        real = export.gguf_tensors

        def wrapped(arch, names, name, data, config):
            return real(arch, names, name, change(name, data), config)
        monkeypatch.setattr(export, "gguf_tensors", wrapped)

    if fault == "norms without +1":
        for model_type in ("gemma2", "gemma3_text", "nemotron"):
            replace_arch(model_type, norm_shift=0.0)
    elif fault == "gemma2 without its attention soft-cap":
        real = gguf_archs.gemma2_hparams

        def gemma2_hparams(writer, config):
            monkeypatch.setattr(writer, "add_attn_logit_softcapping", lambda value: None)
            real(writer, config)
        replace_arch("gemma2", hparams=(gemma2_hparams,))
    elif fault == "gemma3 without its local rope base":
        def gemma3_hparams(writer, config):
            writer.add_sliding_window(config.sliding_window)
        replace_arch("gemma3_text", hparams=(gemma3_hparams,))
    elif fault == "gate and up halves of the experts swapped":
        def swap(name, data):
            if not name.endswith("gate_up_proj"):
                return data
            half = data.shape[1] // 2
            return np.concatenate([data[:, half:], data[:, :half]], axis=1)
        on_experts(swap)
    elif fault == "experts stacked in reverse order":
        on_experts(lambda name, data: data[::-1] if ".experts." in name else data)
    elif fault == "no MoE or parallel-residual keys":
        for model_type in ("qwen2_moe", "qwen3_moe", "stablelm"):
            replace_arch(model_type, hparams=())
    elif fault == "size-1 dimensions kept":
        for model_type in ("lfm2", "qwen2_moe"):
            replace_arch(model_type, squeeze=())
    elif fault == "lfm2 convolution layers given attention heads":
        def lfm2_hparams(writer, config):
            return {**gguf_archs.lfm2_hparams(writer, config), "add_head_count_kv": config.num_key_value_heads}
        replace_arch("lfm2", hparams=(lfm2_hparams,))
    elif fault == "qk rows permuted as for llama":
        for model_type in ("gemma3_text", "qwen3_moe", "starcoder2"):
            replace_arch(model_type, permute_qk=True)


@pytest.mark.parametrize("fault, model_type", [
    ("norms without +1", "gemma3_text"),
    ("gemma2 without its attention soft-cap", "gemma2"),
    ("gemma3 without its local rope base", "gemma3_text"),
    ("gate and up halves of the experts swapped", "qwen3_moe"),
    ("experts stacked in reverse order", "qwen3_moe"),
    ("no MoE or parallel-residual keys", "stablelm"),
    ("qk rows permuted as for llama", "starcoder2"),
    ("size-1 dimensions kept", "lfm2"),
    ("lfm2 convolution layers given attention heads", "lfm2"),
])
def test_a_planted_fault_in_the_glue_fails_the_verification(tmp_path, new_arch_dirs, monkeypatch, fault, model_type):
    from sftlab.errors import SftlabError
    from sftlab.export.gguf import export_gguf

    plant(monkeypatch, fault)
    try:
        result = export_gguf(str(new_arch_dirs[model_type]), tmp_path / model_type, quant="f32")
    except SftlabError as err:  # e.g. LFM2's kernels left 3-D: transformers' loader cannot load them
        assert "cannot read the file back" in str(err) and "\n" not in str(err)
        return
    print("\n".join(result.lines()))
    assert not result.ok, result.lines()


@pytest.mark.parametrize("model_type, change, named", [
    ("gemma2", dict(query_pre_attn_scalar=144), "query_pre_attn_scalar"),
    ("gemma3_text", dict(rope_local_base_freq=20000.0), "rope_parameters.sliding_attention.rope_theta"),
    ("qwen3_moe", dict(norm_topk_prob=False), "norm_topk_prob"),
    ("qwen2_moe", dict(moe_intermediate_size=64), "moe_intermediate_size"),
    ("stablelm", dict(qk_layernorm=True), "qk_layernorm"),
])
def test_what_the_loader_cannot_read_back_is_refused_before_any_work(tmp_path, small_tokenizer, model_type, change,
                                                                      named):
    """A value transformers' GGUF loader does not take from the file (it assumes its default) could
    not be verified: one line naming it, and nothing written."""
    from sftlab.errors import SftlabError
    from sftlab.export.gguf import export_gguf

    src = save_new_arch(tmp_path / model_type, model_type, small_tokenizer, **change)
    with pytest.raises(SftlabError, match=rf"^GGUF export of {model_type}: transformers' GGUF loader does not read "
                                          rf"{named} from the file") as err:
        export_gguf(str(src), tmp_path / "out")
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_a_gemma3_lora_run_trained_by_sftlab_exports_through_the_cli(tmp_path, new_arch_dirs, capsys):
    """As a new user who fine-tuned Gemma 3 would: `sftlab train` (LoRA), then `sftlab export --to gguf`."""
    from sftlab.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"Say {w}", "output": w}) + "\n" for w in ("a", "b", "c", "d")))
    run = tmp_path / "run"
    assert main(["train", "-", f"model.name_or_path={new_arch_dirs['gemma3_text']}", f"data.train={data}",
                 "data.max_seq_length=128", "training.max_steps=3", "training.learning_rate=0.01",
                 "training.bf16=false", "lora.r=4", f"output_dir={run}"]) == 0
    capsys.readouterr()
    assert main(["export", str(run), str(tmp_path / "gguf"), "--to", "gguf", "--quant", "f16"]) == 0
    out = capsys.readouterr().out
    print(out)
    assert "gguf f16 export" in out and "  verified" in out
    verification = json.loads((tmp_path / "gguf" / "sftlab_export.json").read_text())["verification"]
    assert verification["ok"] and verification["max_abs_diff"] <= 2e-2
