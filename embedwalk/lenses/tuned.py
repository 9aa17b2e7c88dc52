"""The tuned lens: one affine translator per readout, h -> h + A h + b, trained so that the
translated residual, read out through the model's own final norm and unembed, matches the
model's final distribution (minimising KL(final || translated), Belrose et al. 2023).

``A`` and ``b`` start at zero, so an untrained lens is exactly the logit lens; the residual
form means weight decay (if any) pulls toward the identity. The final readout has no
translator. Training streams the user's text once per epoch: a reader gathers the residuals
of each batch (detached; the model runs under ``no_grad``) and takes optimiser steps on
minibatches of ``step_tokens`` positions in ``end_batch``, with gradients for the translators
only (``torch.autograd.grad``, so the model's own parameters never receive ``.grad``).
Peak extra memory is about ``step_tokens * d_vocab * 4`` bytes times a few temporaries.

Files: ``tuned_lens.safetensors`` + ``config.json`` holding the fingerprint of every
parameter and buffer of the model (:mod:`embedwalk.fingerprint`, the identity store
manifests and concept fits record) and the residual basis the lens was fitted in
(:func:`embedwalk.basis.residual_basis`: raw, or processed with folded norms / centred
residual / centred unembedding). A lens refuses a model in another basis (the same model in
compatibility mode: centring drops the residual's mean, so no exact conversion exists) or
with other weights (another model, or the same one fine-tuned or edited), naming what differs.
A file written before fingerprints (``unembed_hash`` only) still loads and is checked by its
unembedding hash; its repr says the model is unverified. The tuned-lens project's ``params.pt`` +
``config.json`` also load (:meth:`TunedLens.from_tuned_lens`); they are fitted on the Hugging
Face model's own hidden states, the raw basis, and are refused on a processed model.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from jaxtyping import Float
from torch import Tensor

from embedwalk.adapter import ModelAdapter, ReadoutPoint, adapt
from embedwalk.basis import RAW, describe, residual_basis
from embedwalk.casting import cast_finite
from embedwalk.errors import EmbedwalkError
from embedwalk.fingerprint import UNVERIFIED, Fingerprint, describe_difference
from embedwalk.run import Context, Reader, run

__all__ = ["TunedLens", "TunedLensTrainer", "train_tuned_lens", "load_tuned_lens", "unembedding_hash", "sample_text"]

WEIGHTS_FILE = "tuned_lens.safetensors"
CONFIG_FILE = "config.json"
FORMAT = "embedwalk-tuned-lens/1"


def unembedding_hash(model) -> str:
    """SHA-256 of the float32 unembedding (``W_U``, then ``b_U`` when the model has one): the
    identity lens files recorded before embedwalk fingerprinted the whole model, still used to
    check such files. New lenses record :func:`embedwalk.fingerprint.fingerprint`."""
    adapter = adapt(model)
    h = hashlib.sha256()
    for t in (adapter.W_U, adapter.b_U):
        if t is not None:
            arr = t.detach().to("cpu", torch.float32).contiguous().numpy()
            h.update(str(tuple(arr.shape)).encode())
            h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


class TunedLens(torch.nn.Module):
    """Affine translators in residual form, one per readout label (``"embed"``, ``"0"``, ...).

    Called as ``lens(h, point)`` (a :class:`ReadoutPoint` or its label) it returns the
    translated residual; a readout without a translator passes through unchanged. Plug it
    into :func:`embedwalk.logit_lens` as ``translator=``.
    """

    def __init__(self, labels: Sequence[str], d_model: int, unembed_hash: Optional[str] = None, *, model_name: str = "",
                 meta: Optional[dict] = None, basis: Optional[dict] = None, fingerprint: Optional[dict] = None):
        super().__init__()
        # The model's fingerprint (Fingerprint.to_json()); None: a file from before fingerprints,
        # checked by its unembedding hash only.
        self.fingerprint = dict(fingerprint) if fingerprint is not None else None
        self.basis = dict(basis) if basis is not None else None  # None: a file from before bases were recorded
        self.labels = list(labels)
        self.index = {lab: i for i, lab in enumerate(self.labels)}
        self.d_model = int(d_model)
        self.unembed_hash = unembed_hash
        self.model_name = model_name
        self.meta = dict(meta or {})
        self.weight = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(d_model, d_model)) for _ in self.labels])
        self.bias = torch.nn.ParameterList([torch.nn.Parameter(torch.zeros(d_model)) for _ in self.labels])

    def __repr__(self) -> str:
        # nn.Module's repr lists every translator (dozens of lines); say what the lens is instead.
        # Everything else of nn.Module (parameters, state_dict, .to) is untouched.
        from embedwalk._summary import result_repr

        readouts = ", ".join(self.labels[:12]) + (f", ... ({len(self.labels)} in all)" if len(self.labels) > 12 else "")
        n_params = sum(p.numel() for p in self.parameters())
        return result_repr(self, [
            f"model {self.model_name or '(unnamed)'}, d_model {self.d_model}, {n_params:,} parameters",
            f"readouts ({len(self.labels)}): {readouts}",
            f"basis: {describe(self.basis) if self.basis is not None else 'unrecorded (a file from before bases were recorded)'}",
            f"model: fingerprint {self.fingerprint['digest'][:12]} (verified on load and use)" if self.fingerprint is not None else UNVERIFIED
            + (" (checked by its unembedding hash only)" if self.unembed_hash else ""),
        ])

    @classmethod
    def for_model(cls, model, *, mid: bool = False, readouts: Optional[Sequence[Union[int, str]]] = None, layers=None) -> "TunedLens":
        """An identity-initialised lens for every readout but the final one (or the subset
        ``readouts``: readout indices, 0 = embedding, l+1 = output of block l, or labels).
        ``layers=`` is refused with an error naming ``readouts=`` (it counted readouts)."""
        from embedwalk.lenses.logit import _select_points, refuse_layers

        refuse_layers("TunedLens.for_model", layers)
        adapter = adapt(model)
        points = adapter.readout_points(mid=mid)[:-1]
        if readouts is not None:
            final = adapter.readout_points(mid=mid)[-1]
            points = [p for p in _select_points(adapter.readout_points(mid=mid), readouts) if p != final]
        lens = cls([p.label for p in points], adapter.d_model, model_name=_model_name(adapter), basis=residual_basis(adapter),
                   fingerprint=adapter.fingerprint.to_json())
        return lens.to(adapter.device)

    # -- use
    def forward(self, h: Float[Tensor, "... d_model"], point: Union[ReadoutPoint, str]) -> Float[Tensor, "... d_model"]:
        """The translated residual ``h + h W^T + b`` (in float32), returned in ``h``'s dtype.

        Raises :class:`EmbedwalkError` when ``h`` is 16-bit and a translated value does not fit
        that dtype (beyond float16's 65504), naming the readout, row, dimension and value."""
        label = point.label if isinstance(point, ReadoutPoint) else str(point)
        i = self.index.get(label)
        if i is None:
            return h
        W, b = self.weight[i], self.bias[i]
        x = h.to(W.dtype)  # translators stay float32 even for 16-bit models
        # Back to the model's dtype for its readout: a translation float16 cannot hold is refused.
        return cast_finite(
            x + x @ W.T + b, h.dtype, what=f"the tuned lens's translator at readout {label!r}",
            locate=lambda idx: f"row {list(idx[:-1])}, dimension {idx[-1]}",
            fix=f"The model reads residuals in {str(h.dtype).replace('torch.', '')}; load it in float32 or bfloat16 "
            "(or retrain the lens on this model: train_tuned_lens(model, texts))",
        )

    def check_model(self, model) -> None:
        """Raise unless ``model`` has the width, residual basis and weights this lens was trained for.

        Raises :class:`EmbedwalkError` naming what differs: the width, the basis, or (by the
        fingerprint, :mod:`embedwalk.fingerprint`) which tensors, e.g. "the unembedding matches
        but the body differs: 2 of 272 tensors changed, first model.layers.3.mlp.up_proj.weight".
        A lens from before fingerprints is checked by its unembedding hash only."""
        adapter = adapt(model)
        if adapter.d_model != self.d_model:
            raise EmbedwalkError(
                f"this tuned lens is for d_model={self.d_model} but the model has d_model={adapter.d_model}; "
                f"it was trained for {self.model_name or 'another model'} - train one for this model with train_tuned_lens"
            )
        if self.basis is not None:
            now = residual_basis(adapter)
            if now != self.basis:
                raise EmbedwalkError(
                    f"this tuned lens was fitted in another residual basis: {describe(self.basis)}, but the model's "
                    f"residual stream is {describe(now)}. TransformerLens weight processing (a bridge's compatibility "
                    "mode, HookedTransformer.from_pretrained's defaults) centres the residual stream and folds norms; "
                    "the centred residual has lost its mean, so no exact conversion of the lens exists. Use the model "
                    "the lens was fitted on (e.g. the bridge without enable_compatibility_mode(), or "
                    "HookedTransformer.from_pretrained_no_processing), or train a lens for this one: "
                    "train_tuned_lens(model, texts)"
                )
        mine = Fingerprint.from_json(self.fingerprint)
        if mine is not None and mine.digest != adapter.fingerprint.digest:
            raise EmbedwalkError(
                f"this tuned lens was trained for {self.model_name or 'another model'} (fingerprint {mine.digest[:12]}...), "
                f"but the model given differs: {describe_difference(mine, adapter.fingerprint)}. A lens is only valid for "
                "the exact weights it was fitted on (a fine-tune, an edited or pruned model is another model). Pass "
                "the model the lens was trained on, or train a lens for this one with train_tuned_lens(model, texts)"
            )
        if mine is None and self.unembed_hash and unembedding_hash(adapter) != self.unembed_hash:
            raise EmbedwalkError(
                f"this tuned lens was trained for a model with a different unembedding ({self.model_name or 'unknown'}; "
                "hash mismatch). A lens is only valid for the exact model it was fitted on - note that a "
                "TransformerBridge in compatibility mode folds weights and counts as a different model. "
                "Train a lens for this model with train_tuned_lens(model, texts)."
            )

    # -- files
    def save(self, path: Union[str, Path]) -> Path:
        """Write ``tuned_lens.safetensors`` and ``config.json`` into the folder ``path``."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tensors = {}
        for i in range(len(self.labels)):
            tensors[f"translators.{i}.weight"] = self.weight[i].detach().cpu().contiguous()
            tensors[f"translators.{i}.bias"] = self.bias[i].detach().cpu().contiguous()
        save_file(tensors, str(path / WEIGHTS_FILE))
        config = {
            "format": FORMAT, "labels": self.labels, "d_model": self.d_model,
            "unembed_hash": self.unembed_hash, "model_name": self.model_name, "meta": self.meta,
            "basis": self.basis, "fingerprint": self.fingerprint,
        }
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        return path

    @classmethod
    def load(cls, path: Union[str, Path], model=None) -> "TunedLens":
        """Load an embedwalk lens (or a tuned-lens ``params.pt`` folder, which needs ``model``).
        With ``model`` the lens is checked against it and moved to its device."""
        path = Path(path)
        if (path / "params.pt").exists() and not (path / WEIGHTS_FILE).exists():
            if model is None:
                raise EmbedwalkError("a tuned-lens params.pt checkpoint needs the model: TunedLens.load(path, model)")
            return cls.from_tuned_lens(path, model)
        if not (path / WEIGHTS_FILE).exists() or not (path / CONFIG_FILE).exists():
            raise EmbedwalkError(f"{path} holds no tuned lens: expected {WEIGHTS_FILE} and {CONFIG_FILE} (or params.pt + config.json)")
        from safetensors.torch import load_file

        config = json.loads((path / CONFIG_FILE).read_text())
        if config.get("format") != FORMAT:
            raise EmbedwalkError(f"{path / CONFIG_FILE} is not an embedwalk tuned lens (format {config.get('format')!r})")
        lens = cls(config["labels"], config["d_model"], config.get("unembed_hash"), model_name=config.get("model_name", ""),
                   meta=config.get("meta"), basis=config.get("basis"), fingerprint=config.get("fingerprint"))
        tensors = load_file(str(path / WEIGHTS_FILE))
        with torch.no_grad():
            for i in range(len(lens.labels)):
                lens.weight[i].copy_(tensors[f"translators.{i}.weight"])
                lens.bias[i].copy_(tensors[f"translators.{i}.bias"])
        if model is not None:
            lens.check_model(model)
            lens = lens.to(adapt(model).device)
        return lens

    @classmethod
    def from_tuned_lens(cls, path: Union[str, Path], model) -> "TunedLens":
        """Load the tuned-lens project's folder (``config.json`` + ``params.pt``).

        Their translator ``i`` is an ``nn.Linear`` applied residually to Hugging Face's
        ``hidden_states[i]`` (``i = 0`` the embedding, ``i`` the input of block ``i``), which
        is embedwalk's readout ``i`` on a raw (not compatibility-mode) model. Their unembed
        hash is computed differently, so the sizes and the residual basis are checked here: a
        model with processed weights (compatibility mode, folded norms, centred residual) is
        refused, since the checkpoint was fitted on the raw hidden states.
        """
        adapter = adapt(model)
        basis = residual_basis(adapter)
        if basis != RAW:
            raise EmbedwalkError(
                f"a tuned-lens checkpoint is fitted on the Hugging Face model's own hidden states (the raw residual "
                f"basis), but this model's residual stream is {describe(basis)}; read out here it would give wrong "
                "log-probs without an error. Load it into the raw model: the TransformerBridge without "
                "enable_compatibility_mode(), or HookedTransformer.from_pretrained_no_processing (embedwalk.load_model "
                "gives raw models), or train a lens for this model with train_tuned_lens(model, texts)"
            )
        path = Path(path)
        config = json.loads((path / CONFIG_FILE).read_text())
        d_model, n = int(config.get("d_model", -1)), int(config.get("num_hidden_layers", -1))
        if d_model != adapter.d_model or n != adapter.n_layers:
            raise EmbedwalkError(
                f"the tuned-lens checkpoint is for d_model={d_model}, {n} layers "
                f"({config.get('base_model_name_or_path', '?')}); this model has d_model={adapter.d_model}, "
                f"{adapter.n_layers} layers"
            )
        state = torch.load(path / "params.pt", map_location="cpu", weights_only=True)
        state = {k.removeprefix("layer_translators."): v for k, v in state.items() if not k.startswith("unembed.")}
        labels = [p.label for p in adapter.readout_points()[:n]]
        lens = cls(labels, d_model, model_name=str(config.get("base_model_name_or_path", "")), meta={"source": "tuned-lens"}, basis=RAW,
                   fingerprint=adapter.fingerprint.to_json())
        with torch.no_grad():
            for i in range(n):
                if f"{i}.weight" not in state:
                    raise EmbedwalkError(f"params.pt has no translator {i} (keys like '{i}.weight' expected); is it a tuned-lens checkpoint?")
                lens.weight[i].copy_(state[f"{i}.weight"].float())
                if f"{i}.bias" in state:
                    lens.bias[i].copy_(state[f"{i}.bias"].float())
        return lens.to(adapter.device)

    def extra_repr(self) -> str:
        return f"readouts={self.labels}, d_model={self.d_model}, model={self.model_name!r}"


def load_tuned_lens(path: Union[str, Path], model=None) -> TunedLens:
    """Shorthand for :meth:`TunedLens.load`."""
    return TunedLens.load(path, model)


def _model_name(adapter: ModelAdapter) -> str:
    cfg = adapter.cfg
    return str(getattr(cfg, "model_name", "") or getattr(cfg, "name", "") or "")


# ---------------------------------------------------------------------------- training
class TunedLensTrainer(Reader):
    """Trains ``lens`` on the batches of a run; ``result()`` is the mean KL per translator
    over the batches seen (as training went)."""

    def __init__(self, lens: TunedLens, optimizer: torch.optim.Optimizer, *, step_tokens: int = 128, seed: int = 0):
        self.lens, self.opt, self.step_tokens = lens, optimizer, step_tokens
        self.gen = torch.Generator().manual_seed(seed)
        self.history: list[float] = []

    def start(self, adapter: ModelAdapter) -> None:
        self.adapter = adapter
        points = adapter.readout_points(mid=any(".mid" in lab for lab in self.lens.labels))
        self.final = points[-1]
        self.points = [p for p in points if p.label in self.lens.index]
        self.sums = torch.zeros(len(self.points), dtype=torch.float64)
        self.count = 0
        self._resid: dict[str, Tensor] = {}

    def hook_points(self, adapter: ModelAdapter) -> Sequence[str]:
        return sorted({p.hook for p in self.points} | {self.final.hook})

    def read(self, name: str, value: Tensor, ctx: Context) -> None:
        self._resid[name] = value.detach()[ctx.batch.mask]  # real positions only

    def end_batch(self, ctx: Context) -> None:
        n = self._resid[self.final.hook].shape[0]
        order = torch.randperm(n, generator=self.gen).to(self.adapter.device)
        for s in range(0, n, self.step_tokens):
            rows = order[s : s + self.step_tokens]
            with torch.no_grad():
                zf = self.adapter.readout(self._resid[self.final.hook][rows]).float()
                logp_f = zf.log_softmax(-1)
                p_f = logp_f.exp()
                del zf
            losses = []
            with torch.enable_grad():
                for p in self.points:
                    i = self.lens.index[p.label]
                    W, b = self.lens.weight[i], self.lens.bias[i]
                    z = self.adapter.readout(self.lens(self._resid[p.hook][rows], p)).float()
                    loss = (p_f * (logp_f - z.log_softmax(-1))).sum(-1).mean()
                    W.grad, b.grad = torch.autograd.grad(loss, [W, b])
                    losses.append(float(loss.detach()))
                    del z, loss
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            self.sums += torch.tensor(losses, dtype=torch.float64) * len(rows)
            self.count += len(rows)
            self.history.append(sum(losses) / len(losses))
        self._resid = {}

    def result(self) -> dict:
        return {p.label: float(v) for p, v in zip(self.points, self.sums / max(self.count, 1))}


def train_tuned_lens(
    model,
    texts: Union[str, Sequence[str], Tensor],
    *,
    lens: Optional[TunedLens] = None,
    mid: bool = False,
    readouts: Optional[Sequence[Union[int, str]]] = None,
    epochs: int = 1,
    lr: float = 1e-3,
    optimizer: str = "adam",
    step_tokens: int = 128,
    batch_size: int = 8,
    seed: int = 0,
    progress: Optional[bool] = None,
    attention_mask: Optional[Tensor] = None,
    layers=None,
) -> TunedLens:
    """Train (or continue training) a tuned lens on ``texts``, streaming, one pass per epoch.

    Each optimiser step uses ``step_tokens`` random real positions of the current batch and
    updates every translator. ``optimizer="adam"`` (default, lr 1e-3; robust for the few
    hundred steps a small text gives) or ``"sgd"`` (SGD with Nesterov momentum 0.9, the
    tuned-lens paper's choice for long runs; use lr around 1.0 / d_model-scaled schedules).
    ``readouts`` restricts training to a subset of readouts (indices: 0 = embedding, l+1 =
    output of block l; or labels) to save time. ``layers=`` is refused with an error naming
    ``readouts=``: it counted readouts, while ``layers`` counts blocks everywhere else.
    The lens's ``meta["train_kl"]`` holds the mean training KL per readout of the last epoch
    and ``meta["history"]`` the mean KL per step.
    """
    from embedwalk.lenses.logit import refuse_layers

    refuse_layers("train_tuned_lens", layers)
    adapter = adapt(model)
    if not isinstance(epochs, int) or epochs < 1:
        raise EmbedwalkError(f"epochs must be a positive int, got {epochs!r}")
    if not isinstance(step_tokens, int) or step_tokens < 1:
        raise EmbedwalkError(f"step_tokens must be a positive int, got {step_tokens!r}")
    if lens is None:
        lens = TunedLens.for_model(adapter, mid=mid, readouts=readouts)
    else:
        lens.check_model(adapter)
    params = list(lens.parameters())
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)
    else:
        raise EmbedwalkError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
    trainer = TunedLensTrainer(lens, opt, step_tokens=step_tokens, seed=seed)
    from embedwalk.progress import progress_scope

    history: list[float] = []
    n_texts = 1 if isinstance(texts, str) else (texts.shape[0] if texts.ndim > 1 else 1) if isinstance(texts, Tensor) else len(texts)
    with progress_scope(epochs * n_texts, f"train_tuned_lens ({epochs} epoch{'s' if epochs > 1 else ''})", progress=progress):
        for _ in range(epochs):
            (train_kl,) = run(adapter, texts, readers=[trainer], attention_mask=attention_mask, batch_size=batch_size, progress=progress)
            history += trainer.history
            trainer.history = []
    lens.meta.update({"train_kl": train_kl, "history": history, "optimizer": optimizer, "lr": lr, "epochs": epochs, "step_tokens": step_tokens})
    return lens


# ---------------------------------------------------------------------------- text
def sample_text(split: str = "train") -> list[str]:
    """Paragraphs of real English prose shipped with embedwalk (``embedwalk/data/text``),
    split into ``"train"`` (first ~80% of paragraphs) and ``"heldout"`` (the rest), or ``"all"``."""
    from importlib.resources import files

    folder = files("embedwalk") / "data" / "text"
    paragraphs = []
    for item in sorted(folder.iterdir(), key=lambda f: f.name):
        if item.name.endswith(".txt"):
            paragraphs += [" ".join(p.split()) for p in item.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    cut = int(round(0.8 * len(paragraphs)))
    if split == "train":
        return paragraphs[:cut]
    if split == "heldout":
        return paragraphs[cut:]
    if split == "all":
        return paragraphs
    raise EmbedwalkError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
