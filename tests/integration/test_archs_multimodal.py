"""A new user fine-tunes a multimodal checkpoint (Gemma 3, Mistral Small 3.1, Qwen2.5-VL, Qwen3-VL, Llama 4,
Gemma 3n) on text-only chat data, as the commonest real case is, through sftlab's real commands on tiny random
models: the model loads with the Auto class transformers 5 maps it to, LoRA adapts the language model only, full
fine-tuning leaves the vision tower frozen, the estimate counts what trains, packed examples stay apart, and the
merged export reloads as the same class with its vision tower."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForImageTextToText

from sftlab.cli import main

TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
MROPE = dict(rope_parameters=dict(rope_type="default", mrope_section=[2, 3, 3], rope_theta=1e4))  # head_dim 16
QWEN_VISION = dict(depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64)
# model type -> its text config beyond TEXT, its other sizes (the vision tower's), the class loading it, and the
# vision tower and projector (outside the language model)
ARCHS = {
    "gemma3": (dict(layer_types=["sliding_attention", "full_attention"], sliding_window=16),
               lambda v: dict(vision_config=dict(VISION, image_size=28, patch_size=14), mm_tokens_per_image=4,
                              image_token_index=v - 1, boi_token_index=v - 2, eoi_token_index=v - 3),
               "Gemma3ForConditionalGeneration", ["model.vision_tower", "model.multi_modal_projector"]),
    "mistral3": (dict(model_type="mistral"),
                 lambda v: dict(vision_config=dict(VISION, head_dim=16, image_size=28, patch_size=14,
                                                   model_type="pixtral"), image_token_index=v - 1, spatial_merge_size=1),
                 "Mistral3ForConditionalGeneration", ["model.vision_tower", "model.multi_modal_projector"]),
    "qwen2_5_vl": (MROPE, lambda v: dict(vision_config=dict(QWEN_VISION, fullatt_block_indexes=[0]),
                                         image_token_id=v - 1, video_token_id=v - 2, vision_start_token_id=v - 3),
                   "Qwen2_5_VLForConditionalGeneration", ["model.visual"]),
    "qwen3_vl": (MROPE, lambda v: dict(vision_config=dict(QWEN_VISION, deepstack_visual_indexes=[0]),
                                       image_token_id=v - 1, video_token_id=v - 2),
                 "Qwen3VLForConditionalGeneration", ["model.visual"]),
}


def mm_config(model_type: str, tokenizer, **text):
    v = len(tokenizer)
    own, others, _, _ = ARCHS.get(model_type, ({}, lambda v: {}, "", []))
    ids = dict(pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
               eos_token_id=tokenizer.eos_token_id)
    return AutoConfig.for_model(model_type, text_config=dict(TEXT, vocab_size=v, **ids, **own, **text), **others(v))


@pytest.fixture(scope="module")
def vlm(tmp_path_factory, tokenizer):
    """model type -> a folder with a tiny random model of it (built once per module) and SmolLM2's tokenizer."""
    built = {}

    def get(model_type: str):
        if model_type not in built:
            path = tmp_path_factory.mktemp(model_type)
            torch.manual_seed(0)
            AutoModelForImageTextToText.from_config(mm_config(model_type, tokenizer)).save_pretrained(path)
            tokenizer.save_pretrained(path)
            built[model_type] = path
        return built[model_type]

    return get


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "d.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Say {w}", "output": w}) + "\n" for w in "abcd"))
    return path


def estimate(path, method: str, capsys) -> dict:
    capsys.readouterr()
    assert main(["estimate", str(path), "--method", method, "--lora-r", "4", "--seq-len", "64", "--batch", "1",
                 "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("model_type", list(ARCHS))
def test_lora_adapts_the_language_model_full_freezes_the_vision_tower_and_the_estimate_counts_it(
        model_type, vlm, data, tokenizer, capsys):
    """Mistral 3, Qwen2.5-VL and Qwen3-VL did not load at all (AutoModelForCausalLM refuses them: 'Unrecognized
    configuration class', in train and estimate); on Gemma 3, all-linear put adapters on the SigLIP tower too
    (r=4: 11,008 trainable, not 8,192) and full fine-tuning trained the whole vision tower, which text never runs.
    The estimate counts what trains, the vision tower's frozen weights in memory."""
    from sftlab.config import TrainConfig, load_config
    from sftlab.train.trainer import build_model

    path = vlm(model_type)
    _, _, cls, outside = ARCHS[model_type]
    overrides = [f"model.name_or_path={path}", f"data.train={data}", "lora.r=4"]
    lora = build_model(load_config(None, overrides, cls=TrainConfig), use_bf16=False, tokenizer=tokenizer)
    base = lora.get_base_model()
    assert type(base).__name__ == cls
    adapted = {n for n, m in base.named_modules() if hasattr(m, "lora_A")}
    assert adapted and not [n for n in adapted if n.startswith(tuple(outside))]
    full = build_model(load_config(None, [*overrides, "method=full"], cls=TrainConfig), use_bf16=False,
                       tokenizer=tokenizer)
    frozen = {n for n, p in full.named_parameters() if not p.requires_grad}
    in_outside = {n for n, _ in full.named_parameters() if n.startswith(tuple(outside))}
    assert frozen == in_outside and frozen
    for method, model in (("lora", lora), ("full", full)):
        got = estimate(path, method, capsys)
        assert got["trainable_params"] == sum(p.numel() for p in model.parameters() if p.requires_grad), method
        assert got["n_params"] == sum(p.numel() for p in full.parameters())  # the frozen tower is in memory


def test_a_list_of_layer_names_adapts_the_language_models_layers_of_those_names(vlm, data, tokenizer, capsys):
    """SigLIP has q_proj and v_proj too: lora.target_modules=[q_proj,v_proj] put adapters on the vision tower."""
    from sftlab.config import TrainConfig, load_config
    from sftlab.train.trainer import build_model

    path = vlm("gemma3")
    model = build_model(load_config(None, [f"model.name_or_path={path}", f"data.train={data}", "lora.r=4",
                                           "lora.target_modules=[q_proj,v_proj]"], cls=TrainConfig),
                        use_bf16=False, tokenizer=tokenizer)
    adapted = sorted(n for n, m in model.get_base_model().named_modules() if hasattr(m, "lora_A"))
    assert adapted == [f"model.language_model.layers.{i}.self_attn.{p}" for i in (0, 1) for p in ("q_proj", "v_proj")]
    capsys.readouterr()
    assert main(["estimate", str(path), "--method", "lora", "--lora-r", "4", "--target-modules", "q_proj,v_proj",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["trainable_params"] == sum(
        p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("model_type", ["gemma3", "qwen2_5_vl"])
def test_lora_run_eval_and_merged_export_of_a_vision_language_model(model_type, vlm, data, tmp_path, capsys):
    """Gemma 3 (AutoModelForCausalLM gives its whole multimodal model) and Qwen2.5-VL (AutoModelForImageTextToText):
    a LoRA run says what it adapts, eval runs, and `export --to merged`, an AttributeError traceback on
    Gemma 3 ('Gemma3Config' object has no attribute 'eos_token_id'), writes a model that reloads as the same
    class with the base's vision tower, whose logits are the unmerged model's."""
    from sftlab.models import load_model, model_auto_class

    path = vlm(model_type)
    _, _, cls, outside = ARCHS[model_type]
    run, merged = tmp_path / "run", tmp_path / "merged"
    assert main(["train", "-", f"model.name_or_path={path}", f"data.train={data}", "data.max_seq_length=64",
                 "training.max_steps=1", "training.bf16=false", "training.learning_rate=0.01", "lora.r=4",
                 f"output_dir={run}"]) == 0
    out = capsys.readouterr().out
    assert (f"lora.target_modules all-linear: {cls} is multimodal and the data is text: the language model's linear "
            f"layers get adapters; {', '.join(outside)}") in out
    assert main(["eval", str(run), "--data", str(data), "--max-new-tokens", "2", "--out", str(tmp_path / "eval")]) == 0
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert main(["export", str(run), str(merged), "--to", "merged"]) == 0
    capsys.readouterr()
    config = AutoConfig.from_pretrained(merged)
    reloaded = model_auto_class(config).from_pretrained(merged, dtype=torch.float32).eval()
    assert type(reloaded).__name__ == cls
    assert f"model = {model_auto_class(config).__name__}.from_pretrained" in (merged / "README.md").read_text()
    assert f"base = {model_auto_class(config).__name__}.from_pretrained(BASE)" in (run / "README.md").read_text()
    base, saved = load_file(path / "model.safetensors"), load_file(merged / "model.safetensors")
    tower = [k for k in base if any(f".{p.split('.')[-1]}." in f".{k}" for p in outside)]
    assert tower and all(torch.equal(base[k], saved[k]) for k in tower)
    unmerged = load_model(str(run), dtype="float32").eval()
    ids = torch.tensor([[1, 5, 9, 200, 3000, 42]])
    with torch.no_grad():
        diff = (reloaded(input_ids=ids).logits - unmerged(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-4


def test_packed_examples_stay_apart_in_qwen2_5_vl(vlm):
    """Qwen2.5-VL reads 2-D position_ids as its three rotary rows and builds a plain causal mask: packed examples
    saw each other, and the default data.packing was refused. Given its documented packed form (the text positions
    first), the loss of a packed row is the sum of its examples' losses, and one example's is unchanged."""
    from sftlab.models import load_model
    from sftlab.train.loss import selective_loss_sum
    from sftlab.train.trainer import text_positions_first

    model = load_model(str(vlm("qwen2_5_vl"))).eval()
    g = torch.Generator().manual_seed(0)
    a, b = torch.randint(100, 1000, (1, 7), generator=g), torch.randint(100, 1000, (1, 9), generator=g)
    la, lb = a.clone(), b.clone()
    la[:, :3], lb[:, :4] = -100, -100

    def loss(ids, labels, positions):
        with torch.no_grad():
            return selective_loss_sum(model, {"input_ids": ids, "labels": labels, "position_ids": positions[None]})[0]

    alone = [loss(a, la, torch.arange(7)), loss(b, lb, torch.arange(9))]
    packed_labels = torch.cat([la, lb], 1)
    packed_labels[0, 7] = -100  # the first token of b is predicted by no position of b alone
    packed = (torch.cat([a, b], 1), packed_labels, torch.cat([torch.arange(7), torch.arange(9)]))
    assert text_positions_first(model)
    torch.testing.assert_close(loss(*packed), alone[0] + alone[1], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(loss(a, la, torch.arange(7)), alone[0], rtol=0, atol=0)


def test_llama4_says_that_its_vision_tower_is_not_loaded(tokenizer, data, tmp_path, capsys):
    """transformers maps a 'llama4' checkpoint to Llama4ForCausalLM, its language model alone (the whole model's
    forward fails in transformers 5.24): the run trained and saved a model without the vision tower, silently."""
    path = tmp_path / "llama4"
    text = dict(intermediate_size_mlp=128, num_local_experts=2, num_experts_per_tok=1, interleave_moe_layer_step=1,
                no_rope_layers=[1, 1], vocab_size=len(tokenizer))
    config = AutoConfig.for_model("llama4", text_config=dict(TEXT, **text), image_token_index=len(tokenizer) - 1,
                                  vision_config=dict(VISION, image_size=28, patch_size=14, vision_output_dim=32,
                                                     projector_input_dim=32, projector_output_dim=32))
    torch.manual_seed(0)
    AutoModelForImageTextToText.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    assert main(["train", "-", f"model.name_or_path={path}", f"data.train={data}", "data.max_seq_length=64",
                 "training.max_steps=1", "training.bf16=false", "lora.r=4", f"output_dir={tmp_path / 'run'}"]) == 0
    assert ("Llama4ForCausalLM: transformers loads this multimodal checkpoint for text generation as its language "
            "model alone: its vision_config part is not loaded") in capsys.readouterr().out


def test_gemma3n_without_timm_is_one_error_line(tokenizer, data, tmp_path, capsys):
    """Gemma 3n's vision tower is a timm model: without timm, estimate and train were ImportError tracebacks."""
    import importlib.util

    from safetensors.torch import save_file

    if importlib.util.find_spec("timm") is not None:
        pytest.skip("timm is installed: Gemma 3n builds")
    path = tmp_path / "gemma3n"
    AutoConfig.for_model("gemma3n").save_pretrained(path)
    tokenizer.save_pretrained(path)
    save_file({"x": torch.zeros(1)}, path / "model.safetensors")  # weights are read after the model is built
    assert main(["estimate", str(path), "--method", "lora"]) == 1
    assert main(["train", "-", f"model.name_or_path={path}", f"data.train={data}", "training.max_steps=1",
                 f"output_dir={tmp_path / 'run'}"]) == 1
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 2 and all("requires the timm library" in x and "(pip install timm)" in x for x in lines)
    assert "Traceback" not in err


@pytest.mark.parametrize("model_type", ["qwen2_5_vl", "mistral3"])
def test_sftlab_serve_s_engine_loads_a_vision_language_model_and_decodes_as_transformers(vlm, model_type):
    """A merged Qwen2.5-VL / Mistral 3 (what `export --to merged` writes) could not be served: the engine loaded
    every folder with AutoModelForCausalLM, which refuses them."""
    from sftlab.serve.generation import GenRequest, TorchEngine, encode

    engine = TorchEngine.from_pretrained(vlm(model_type))
    assert type(engine.model).__name__ == ARCHS[model_type][2]
    ids = encode(engine.tokenizer, messages=[{"role": "user", "content": "Hi there, how are you?"}])
    got = engine.generate([GenRequest(ids, 6), GenRequest(ids[:-2], 6)])
    for prompt, result in zip((ids, ids[:-2]), got):  # the shorter one left-padded beside the other
        expected = engine.model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False)[0, len(prompt):]
        assert result.tokens == expected.tolist()[:len(result.tokens)] and result.tokens
