"""Context modules inserted into a trained backbone: their gain at initialisation, measured.

A context module on a residual branch maps the branch's features X (N, C, H, W) to Y. At
initialisation its Jacobian J = dY/dX decides how much the gradients grow on their way back
through it, and so how far the first optimizer step moves the backbone. This module measures,
for every context module of a model (ACM, SE and the other registered peers):

* the feature statistics of X: ``sigma`` (the RMS over samples and channels of the spatial
  standard deviation of X), ``mean`` (the RMS of the per-channel spatial means), and for ACM
  the spread of its map logits, how flat its maps are and its P;
* the forward change ``||Y - X|| / ||X||``;
* the gain of J^T on three kinds of upstream gradients dY: ``white`` (i.i.d. Gaussian),
  ``coherent`` (one Gaussian value per sample and channel, the same at every position, as a
  gradient that pools over space is), and ``top`` (the largest singular value of J, by power
  iteration with a finite-difference J v and an autograd J^T u, in float64);
* in a training forward of the detector: ``grad_ratio`` = ||dL/dX|| / ||dL/dY||, the growth
  of the real gradient through the module, and the gradient norm of the backbone's
  parameters against the same backbone without modules.

:func:`sweep_feature_statistics` measures the same gains for single modules on synthetic X
with chosen spatial std and channel means. ``tools/measure_init_gain.py`` runs it all and
writes docs/initialisation.md's tables and figures.
"""
import contextlib
import copy
import json
import logging
import math
import statistics
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

__all__ = [
    "COCO_RECIPE",
    "PEERS",
    "SCENARIOS",
    "backbone_gradient_norms",
    "build_from_state",
    "coco_recipe",
    "context_module_types",
    "feature_statistics",
    "first_steps",
    "frozen_bn_from_images",
    "jacobian_gains",
    "measure_model",
    "measure_start",
    "module_overrides",
    "named_context_modules",
    "plain_start",
    "probe_context_modules",
    "read_training_curve",
    "report_markdown",
    "run_init_comparison",
    "run_scenario",
    "run_sweep",
    "sweep_feature_statistics",
    "training_inputs",
    "warmup_learning_rates",
    "write_backbone_checkpoint",
    "write_report",
]

logger = logging.getLogger(__name__)


def context_module_types() -> tuple:
    """The classes of the context modules a backbone can host (the registered ones)."""
    from ..modeling.acm import ACM

    types = [ACM]
    try:
        from ..modeling.context import CONTEXT_MODULE_REGISTRY

        types += [cls for _, cls in CONTEXT_MODULE_REGISTRY]
    except ImportError:  # before the registry: ACM and SE
        from ..modeling.squeeze_excitation import SqueezeExcitation

        types.append(SqueezeExcitation)
    return tuple(dict.fromkeys(types))


def named_context_modules(model: nn.Module) -> "OrderedDict[str, nn.Module]":
    """The context modules of ``model`` in registration order, by their full name (outermost
    only: a module inside another context module is not listed)."""
    types = context_module_types()
    found: "OrderedDict[str, nn.Module]" = OrderedDict()
    for name, module in model.named_modules():
        if isinstance(module, types) and not any(name.startswith(f"{outer}.") for outer in found):
            found[name] = module
    return found


class _Probe(nn.Module):
    """Stands in for a context module while it is measured: runs it, appends (name, X, Y) to
    ``records`` (a list owned by :func:`probe_context_modules`) and returns a copy of Y, so
    that the host's in-place shortcut add leaves the recorded Y intact."""

    def __init__(self, name: str, inner: nn.Module, records: list):
        super().__init__()
        self.name = name
        self.inner = inner
        self.records = records

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        self.records.append((self.name, x, y))
        return y.clone()


@contextlib.contextmanager
def probe_context_modules(model: nn.Module):
    """Within the block, every context module of ``model`` is wrapped by a probe; yields the
    list that each forward fills with (name, X, Y), in call order. The modules are put back
    on exit, and nothing stays on them."""
    records: list = []
    placed = []
    for name, module in named_context_modules(model).items():
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, _Probe(name, module, records))
        placed.append((parent, attr, module))
    try:
        yield records
    finally:
        for parent, attr, module in placed:
            setattr(parent, attr, module)


def feature_statistics(x: torch.Tensor) -> Dict[str, float]:
    """x (N, C, H, W) -> {"sigma": RMS over (N, C) of the spatial std, "mean": RMS over (N, C)
    of the spatial mean, "rms": RMS of x}."""
    x = x.detach().double()
    return {
        "sigma": float(x.var(dim=(2, 3), unbiased=False).mean().sqrt()),
        "mean": float(x.mean(dim=(2, 3)).pow(2).mean().sqrt()),
        "rms": float(x.pow(2).mean().sqrt()),
    }


@torch.no_grad()
def _acm_statistics(module: nn.Module, x: torch.Tensor) -> Dict[str, float]:
    """ACM only: the spatial std of its map logits, ``flatness`` = exp(entropy) / HW of its
    maps (1: uniform, 1 / HW: one position), RMS of (K - Q) / sigma, and the mean of P."""
    from ..modeling.acm import ACM

    if not isinstance(module, ACM) or module.kq_logits is None:
        return {}
    x = x.detach().double()
    n, c, h, w = x.shape
    g = module.groups
    logits = module.attention_logits(x)  # (N, G, M, HW)
    maps = torch.softmax(logits, dim=-1)
    entropy = -(maps * maps.clamp_min(1e-300).log()).sum(-1)
    centred = (x - x.mean(dim=(2, 3), keepdim=True)).view(n, g, c // g, h * w)
    pooled = torch.einsum("ngmp,ngcp->ngmc", maps, centred)  # (N, G, M, C/G)
    shift = pooled[:, :, 0] - pooled[:, :, 1] if pooled.shape[2] == 2 else pooled[:, :, 0]
    sigma = feature_statistics(x)["sigma"]
    out = {
        "logit_std": float(logits.std(dim=-1).mean()),
        "flatness": float((entropy.exp() / (h * w)).mean()),
        "shift_over_sigma": float(shift.pow(2).mean().sqrt()) / max(sigma, 1e-300),
    }
    if module.channel_gate is not None:
        gate = torch.sigmoid(module.channel_gate.double()(x.mean(dim=(2, 3), keepdim=True)))
        out["mean_P"] = float(gate.mean())
    return out


def jacobian_gains(module: nn.Module, x: torch.Tensor, probes: int = 3, iterations: int = 12,
                   seed: int = 0) -> Dict[str, float]:
    """The gains of ``module``'s Jacobian J = dY/dX at X = ``x`` (N, C, H, W), in float64.

    Returns {"forward": ||Y - X|| / ||X||, "white", "coherent": mean over ``probes`` upstream
    gradients u of ||J^T u|| / ||u|| (u i.i.d. Gaussian / one Gaussian per sample and channel,
    constant over H, W), "top": the largest singular value of J (``iterations`` power steps)},
    plus :func:`feature_statistics` of x and, for ACM, its map statistics.
    """
    m = copy.deepcopy(module).double().eval()
    x64 = x.detach().double().clone().requires_grad_(True)
    gen = torch.Generator().manual_seed(seed)
    y = m(x64)
    n, c = x64.shape[:2]

    def vjp(u: torch.Tensor) -> torch.Tensor:
        (g,) = torch.autograd.grad(y, x64, u, retain_graph=True)
        return g

    def jvp(v: torch.Tensor) -> torch.Tensor:
        step = 1e-4 * float(x64.detach().norm().clamp_min(1.0)) / float(v.norm())
        with torch.no_grad():
            return (m(x64.detach() + step * v) - m(x64.detach() - step * v)) / (2 * step)

    out = dict(feature_statistics(x64))
    out["forward"] = float((y.detach() - x64.detach()).norm() / x64.detach().norm().clamp_min(1e-300))
    white, coherent = [], []
    for _ in range(probes):
        u = torch.randn(y.shape, generator=gen, dtype=torch.float64)
        white.append(float(vjp(u).norm() / u.norm()))
        u = torch.randn(n, c, 1, 1, generator=gen, dtype=torch.float64).expand_as(y).contiguous()
        coherent.append(float(vjp(u).norm() / u.norm()))
    out["white"] = statistics.fmean(white)
    out["coherent"] = statistics.fmean(coherent)
    v = torch.randn(x64.shape, generator=gen, dtype=torch.float64)
    v /= v.norm()
    top = 0.0
    for _ in range(iterations):
        jv = jvp(v)
        top = float(jv.norm())
        if top == 0.0:
            break
        v = vjp(jv / top)
        v /= v.norm().clamp_min(1e-300)
    out["top"] = top
    out.update(_acm_statistics(m, x64.detach()))
    return out


def training_inputs(cfg, count: int, dataset: Optional[str] = None) -> List[dict]:
    """The first ``count`` images of ``dataset`` (default DATASETS.TRAIN[0]) mapped for
    training by Detectron2's DatasetMapper (with their instances)."""
    from detectron2.data import DatasetCatalog, DatasetMapper

    from ..data import ensure_synthetic_dataset

    name = dataset or cfg.DATASETS.TRAIN[0]
    ensure_synthetic_dataset([name])
    mapper = DatasetMapper(cfg, is_train=True)
    torch.manual_seed(0)  # the mapper's random flip
    return [mapper(copy.deepcopy(d)) for d in DatasetCatalog.get(name)[:count]]


@torch.no_grad()
def frozen_bn_from_images(model: nn.Module, inputs: List[dict]) -> nn.Module:
    """Set the statistics of every BatchNorm of ``model`` (built with NORM "BN") to those of
    its input on ``inputs`` in one forward pass of the backbone, then turn them into
    Detectron2's FrozenBatchNorm2d: the start of a model whose FrozenBN statistics are set
    from an image. Returns the model (converted in place where possible)."""
    from detectron2.layers import FrozenBatchNorm2d

    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = 1.0
    model.train()
    images = model.preprocess_image(inputs)
    model.backbone(images.tensor)
    return FrozenBatchNorm2d.convert_frozen_batchnorm(model)


def _loss(model: nn.Module, inputs: List[dict]) -> torch.Tensor:
    """The total training loss of a Detectron2 model on ``inputs``."""
    from detectron2.utils.events import EventStorage

    with EventStorage(0):
        return sum(model(inputs).values())


def _norm(tensors) -> float:
    return math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in tensors if t is not None))


def _stage_of(name: str) -> str:
    for part in name.split("."):
        if part.startswith("res") or part == "stem":
            return part
    return "other"


def backbone_gradient_norms(model: nn.Module, inputs: List[dict]) -> Dict[str, float]:
    """||dL/dtheta|| of the bottom-up backbone's parameters per stage ("stem", "res2", ...) and
    together ("all"), without the context modules' own parameters, whose norm is "context",
    and the loss, for one training forward."""
    model.train()
    model.zero_grad(set_to_none=True)
    loss = _loss(model, inputs)
    loss.backward()
    context = {id(p) for m in named_context_modules(model).values() for p in m.parameters()}
    norms: Dict[str, list] = {}
    for name, p in model.backbone.named_parameters():
        if p.grad is not None and id(p) not in context and "bottom_up" in name:
            norms.setdefault(_stage_of(name), []).append(p.grad)
    out = {stage: _norm(grads) for stage, grads in norms.items()}
    out["all"] = _norm([g for grads in norms.values() for g in grads])
    out["context"] = _norm([p.grad for m in named_context_modules(model).values() for p in m.parameters()])
    out["loss"] = float(loss)
    model.zero_grad(set_to_none=True)
    return out


def measure_model(model: nn.Module, inputs: List[dict], jacobian: bool = True, **gain_options) -> List[Dict]:
    """Per context module of ``model`` (in forward order), in one training forward on
    ``inputs``: the real gradient growth ``grad_ratio`` = ||dL/dX|| / ||dL/dY|| and, with
    ``jacobian``, :func:`jacobian_gains` at its X (the first image only, to keep it cheap)."""
    model.train()
    with probe_context_modules(model) as records:
        loss = _loss(model, inputs)
        xs = [x for _, x, _ in records]
        ys = [y for _, _, y in records]
        grads = torch.autograd.grad(loss, xs + ys, allow_unused=True)
    modules = named_context_modules(model)
    rows = []
    for i, (name, x, _) in enumerate(records):
        gx, gy = grads[i], grads[len(records) + i]
        row = {"module": name, "type": type(modules[name]).__name__, "channels": int(x.shape[1]),
               "hw": int(x.shape[2] * x.shape[3])}
        row["grad_ratio"] = _norm([gx]) / max(_norm([gy]), 1e-300) if gx is not None and gy is not None else math.nan
        if jacobian:
            row.update(jacobian_gains(modules[name], x[:1], **gain_options))
        else:
            row.update(feature_statistics(x))
        rows.append(row)
    return rows


def first_steps(model: nn.Module, inputs: List[dict], learning_rates: Sequence[float], momentum: float = 0.9,
                weight_decay: float = 1e-4) -> List[float]:
    """SGD steps on the same ``inputs`` as Detectron2's SimpleTrainer takes them, one per
    learning rate of ``learning_rates`` (the warmup's); returns the total loss before each step
    and after the last (len(learning_rates) + 1 values; it stops at the first non-finite one, nan
    where the RPN refused non-finite predictions)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=learning_rates[0], momentum=momentum, weight_decay=weight_decay)
    model.train()
    losses = []
    for lr in list(learning_rates) + [None]:
        try:
            loss = _loss(model, inputs)
        except FloatingPointError:  # Detectron2's RPN: "Predicted boxes or scores contain Inf/NaN"
            losses.append(math.nan)
            break
        losses.append(float(loss))
        if lr is None or not math.isfinite(losses[-1]):
            break
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return losses


def sweep_feature_statistics(factories: Dict[str, Callable[[], nn.Module]], channels: int, size: int,
                             sigmas: Sequence[float], means: Sequence[float] = (0.0,), batch: int = 1,
                             seed: int = 0) -> List[Dict]:
    """:func:`jacobian_gains` of fresh modules (``factories``: label -> a module of ``channels``
    channels, built with torch's generator seeded by ``seed``) on Gaussian X (``batch``,
    ``channels``, ``size``, ``size``) of spatial std sigma around per-channel means drawn as
    N(0, mean^2), for every sigma in ``sigmas`` and mean in ``means``."""
    rows = []
    for label, factory in factories.items():
        torch.manual_seed(seed)
        module = factory()
        for mean in means:
            for sigma in sigmas:
                gen = torch.Generator().manual_seed(seed + 1)
                noise = torch.randn(batch, channels, size, size, generator=gen, dtype=torch.float64)
                offsets = torch.randn(batch, channels, 1, 1, generator=gen, dtype=torch.float64)
                x = sigma * noise + mean * offsets
                row = {"module": label, "sigma_set": sigma, "mean_set": mean}
                row.update(jacobian_gains(module, x))
                rows.append(row)
    return rows


# ----------------------------------------------------------------------------------------
# Whole models: a user's start (a trained plain backbone, FrozenBN, modules inserted).

#: SOLVER.* of Detectron2's COCO 1x recipe (16 images per batch); :func:`coco_recipe` scales it.
COCO_RECIPE = {"BASE_LR": 0.02, "IMS_PER_BATCH": 16, "WARMUP_ITERS": 1000, "WARMUP_FACTOR": 0.001,
               "MOMENTUM": 0.9, "WEIGHT_DECAY": 1e-4}


_PLAIN = ["MODEL.ACM.MODULE", "none", "MODEL.ACM.ORTH_LOSS_WEIGHT", "0.0"]


def module_overrides(label: str) -> List[str]:
    """MODEL.ACM overrides for a label: "plain", "ACM authors", "ACM identity", or the
    registered name of another context module ("SE", "NL", ...; no orthogonality loss)."""
    if label == "plain":
        return list(_PLAIN)
    if label.startswith("ACM"):
        init = label.split()[1] if " " in label else "authors"
        return ["MODEL.ACM.MODULE", "ACM"] + (["MODEL.ACM.INIT", init] if init != "authors" else [])
    return ["MODEL.ACM.MODULE", label, "MODEL.ACM.ORTH_LOSS_WEIGHT", "0.0"]


def coco_recipe(ims_per_batch: int, warmup_iters: Optional[int] = None) -> List[str]:
    """The COCO recipe's SOLVER overrides for ``ims_per_batch`` images: LR scaled linearly,
    the warmup's length inversely (in images it stays 16k; ``warmup_iters`` overrides it for
    short schedules), momentum and weight decay as they are, no gradient clipping."""
    scale = ims_per_batch / COCO_RECIPE["IMS_PER_BATCH"]
    warmup = warmup_iters if warmup_iters is not None else round(COCO_RECIPE["WARMUP_ITERS"] / scale)
    return [
        "SOLVER.IMS_PER_BATCH", str(ims_per_batch), "SOLVER.BASE_LR", repr(COCO_RECIPE["BASE_LR"] * scale),
        "SOLVER.WARMUP_ITERS", str(warmup), "SOLVER.WARMUP_FACTOR", repr(COCO_RECIPE["WARMUP_FACTOR"]),
        "SOLVER.WARMUP_METHOD", "linear", "SOLVER.MOMENTUM", repr(COCO_RECIPE["MOMENTUM"]),
        "SOLVER.WEIGHT_DECAY", repr(COCO_RECIPE["WEIGHT_DECAY"]), "SOLVER.CLIP_GRADIENTS.ENABLED", "False",
    ]


def warmup_learning_rates(cfg, steps: int) -> List[float]:
    """The learning rates of the first ``steps`` iterations of cfg's linear warmup."""
    base, factor, length = cfg.SOLVER.BASE_LR, cfg.SOLVER.WARMUP_FACTOR, max(cfg.SOLVER.WARMUP_ITERS, 1)
    return [base * (factor * (1 - min(i / length, 1.0)) + min(i / length, 1.0)) for i in range(steps)]


def build_from_state(cfg, state: Dict[str, torch.Tensor], seed: int = 0) -> nn.Module:
    """``build_model(cfg)`` (torch seeded with ``seed``) loaded with ``state`` the way
    Detectron2's checkpointer loads a checkpoint (``load_state_dict(strict=False)``); raises
    if a key other than a context module's is missing or unexpected."""
    from detectron2.modeling import build_model

    torch.manual_seed(seed)
    model = build_model(cfg)
    result = model.load_state_dict(state, strict=False)
    context = tuple(f"{name}." for name in named_context_modules(model))
    missing = [k for k in result.missing_keys if not k.startswith(context)]
    if missing or result.unexpected_keys:
        raise RuntimeError(f"loading the plain weights: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}")
    return model


def plain_start(config_file: str, opts: Sequence[str], backbone_weights: Optional[str], seed: int = 0,
                calibrate_on: Optional[List[dict]] = None) -> Dict[str, torch.Tensor]:
    """The state dict of a user's start without context modules: the model of ``config_file``
    with MODEL.ACM.MODULE "none", its bottom-up backbone loaded from ``backbone_weights`` (a
    Detectron2 checkpoint of a model trained with BN, whose BN weights and statistics become
    FrozenBN's), the rest freshly initialised (seed ``seed``), as when a user starts from
    ImageNet weights. Without weights (``backbone_weights`` None), the backbone is random and
    its FrozenBN statistics are set from the images ``calibrate_on``
    (:func:`frozen_bn_from_images`), or, without those, FrozenBN's defaults (the identity)."""
    from detectron2.modeling import build_model

    from ..checkpoint import safe_torch_load
    from ..config import get_acm_cfg

    if backbone_weights is None and calibrate_on is None:  # FrozenBN's defaults: the identity
        cfg = get_acm_cfg(config_file, list(opts) + _PLAIN + ["MODEL.RESNETS.NORM", "FrozenBN"])
        torch.manual_seed(seed)
        state = build_model(cfg).state_dict()
    elif backbone_weights is None:
        # FREEZE_AT 0 while calibrating: every stage's BN gets the statistics, frozen ones too.
        cfg = get_acm_cfg(config_file, list(opts) + _PLAIN + ["MODEL.RESNETS.NORM", "BN", "MODEL.BACKBONE.FREEZE_AT", "0"])
        torch.manual_seed(seed)
        model = frozen_bn_from_images(build_model(cfg), calibrate_on)
        state = model.state_dict()
    else:
        cfg = get_acm_cfg(config_file, list(opts) + _PLAIN + ["MODEL.RESNETS.NORM", "FrozenBN"])
        torch.manual_seed(seed)
        model = build_model(cfg)
        trained = safe_torch_load(backbone_weights)
        trained = trained.get("model", trained)
        backbone = {k: v for k, v in trained.items() if k.startswith("backbone.bottom_up.")}
        state = model.state_dict()
        unknown = sorted(k for k in set(backbone) - set(state) if not k.endswith("num_batches_tracked"))
        if unknown:
            raise RuntimeError(f"{backbone_weights}: keys the plain backbone does not have: {unknown[:5]}")
        state.update(backbone)
    # BN's counter, which FrozenBN built from a config does not have.
    return {k: v.detach().clone() for k, v in state.items() if not k.endswith("num_batches_tracked")}


def measure_start(config_file: str, opts: Sequence[str], state: Dict[str, torch.Tensor], modules: Dict[str, List[str]],
                  inputs: List[dict], steps: int = 3, learning_rates: Optional[Sequence[float]] = None,
                  seed: int = 0, **gain_options) -> Dict[str, Dict]:
    """For each entry of ``modules`` (label -> MODEL.ACM overrides, e.g. {"ACM authors":
    ["MODEL.ACM.MODULE", "ACM"]}): the model of ``config_file`` + ``opts`` + the overrides
    (FrozenBN) loaded with ``state`` (a :func:`plain_start`), and measured on ``inputs``:
    the per-module rows of :func:`measure_model`, the backbone's parameter gradient norms
    (:func:`backbone_gradient_norms`) and the losses of the first ``steps`` SGD steps
    (:func:`first_steps`) at the recipe's warmup learning rates (or ``learning_rates``)."""
    from ..config import get_acm_cfg

    out = {}
    for label, overrides in modules.items():
        cfg = get_acm_cfg(config_file, list(opts) + ["MODEL.RESNETS.NORM", "FrozenBN"] + list(overrides))
        model = build_from_state(cfg, state)
        # The same random draws (RPN and ROI sampling) for every label: seeded before each part.
        torch.manual_seed(seed)
        rows = measure_model(model, inputs, **gain_options) if named_context_modules(model) else []
        torch.manual_seed(seed)
        grads = backbone_gradient_norms(model, inputs)
        rates = list(learning_rates) if learning_rates is not None else warmup_learning_rates(cfg, steps)
        torch.manual_seed(seed)
        losses = first_steps(model, inputs, rates, momentum=cfg.SOLVER.MOMENTUM, weight_decay=cfg.SOLVER.WEIGHT_DECAY)
        out[label] = {"modules": rows, "gradients": grads, "losses": losses, "learning_rates": rates}
        logger.info("%s: backbone gradient %.4g, losses %s", label, grads["all"], ["%.4g" % v for v in losses])
    return out


# ----------------------------------------------------------------------------------------
# Training from a user's start: plain vs ACM with either init, several seeds.


def write_backbone_checkpoint(trained: str, out: str) -> Path:
    """Write to ``out`` a Detectron2 checkpoint holding only the bottom-up backbone of the
    checkpoint ``trained`` (as ImageNet weights hold only the backbone)."""
    from ..checkpoint import safe_torch_load

    state = safe_torch_load(trained)
    state = state.get("model", state)
    backbone = {k: v for k, v in state.items() if k.startswith("backbone.bottom_up.") and not k.endswith("num_batches_tracked")}
    if not backbone:
        raise ValueError(f"{trained} has no backbone.bottom_up.* keys")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": backbone}, out)
    return out


def read_training_curve(output_dir) -> Dict[str, list]:
    """{"iteration": [...], "total_loss": [...]} from a run's metrics.json."""
    curve: Dict[str, list] = {"iteration": [], "total_loss": []}
    path = Path(output_dir) / "metrics.json"
    if path.is_file():
        for line in path.read_text().splitlines():
            entry = json.loads(line) if line.strip() else {}
            if "total_loss" in entry:
                curve["iteration"].append(entry["iteration"])
                curve["total_loss"].append(entry["total_loss"])
    return curve


def run_init_comparison(config_file: str, weights: str, output_dir, labels: Sequence[str], seeds: int,
                        opts: Sequence[str] = (), jobs: int = 2, threads: int = 1, reuse: bool = True) -> List[Dict]:
    """Train ``config_file`` + ``opts`` from ``weights`` (MODEL.WEIGHTS) with MODEL.RESNETS.NORM
    FrozenBN, once per label of ``labels`` (:func:`module_overrides`) and seed 0..``seeds``-1,
    each a tools/train_net.py run (``jobs`` at a time, ``threads`` each) in
    ``output_dir/<label>/seed<i>``; finished runs are reused. Returns one dict per run:
    label, seed, metrics (AP), curve (:func:`read_training_curve`), or failed (the error)."""
    from .runs import run_train_net

    out = Path(output_dir)

    def one(label: str, seed: int) -> Dict:
        run_dir = out / label.replace(" ", "_") / f"seed{seed}"
        run_opts = list(opts) + ["MODEL.WEIGHTS", str(Path(weights).resolve()), "MODEL.RESNETS.NORM", "FrozenBN"]
        run_opts += module_overrides(label) + ["SEED", str(seed)]
        done = run_dir / "result.json"
        if reuse and done.is_file():
            saved = json.loads(done.read_text())
            if saved.get("opts") == run_opts:
                logger.info("Reusing %s", done)
                return saved
        run_dir.mkdir(parents=True, exist_ok=True)
        result = {"label": label, "seed": seed, "opts": run_opts}
        try:
            result["metrics"] = run_train_net(config_file, run_opts, run_dir, threads=threads, log_path=run_dir / "train_net.out")
        except RuntimeError as e:
            logger.error("%s seed %d failed: %s", label, seed, e)
            result["failed"] = str(e)
        result["curve"] = read_training_curve(run_dir)
        if "failed" not in result:
            done.write_text(json.dumps(result, indent=1))
        return result

    with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
        futures = [pool.submit(one, label, seed) for seed in range(seeds) for label in labels]
        return [f.result() for f in futures]


# ----------------------------------------------------------------------------------------
# The measurements of docs/initialisation.md, their tables and figures.

#: The built-in R-18 setting and the COCO R-50 config the scenarios use.
R18_CONFIG = "configs/Synthetic/mask_rcnn_R_18_FPN_acm.yaml"
R50_CONFIG = "configs/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_1x_acm.yaml"

#: What each whole-model scenario measures: a user's start and the labels compared.
SCENARIOS = {
    "pretrained": "R-18 trained on the built-in data (BN -> FrozenBN), modules inserted, 96 px images",
    "pretrained_384": "the same R-18 start, images upsampled to 384 px (16x the positions)",
    "random_calibrated": "R-50 with random weights, FrozenBN statistics set from an image, 320 px images",
    "random_default": "R-50 with random weights, FrozenBN with its defaults (mean 0, var 1), 320 px images",
}

#: The peers measured when they are registered (their default settings).
PEERS = ("SE", "GC", "CBAM", "NL", "CC")

_SWEEP_SIGMAS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)


def _registered_peers() -> List[str]:
    names = [cls.NAME if hasattr(cls, "NAME") else cls.__name__ for cls in context_module_types()]
    return [p for p in PEERS if p in names]


def _peer_factory(name: str, channels: int) -> Callable[[], nn.Module]:
    from ..modeling.context import build_context_module

    return lambda: build_context_module(name, channels)


def run_sweep(channels: int = 512, groups: int = 16, size: int = 16, sigmas: Sequence[float] = _SWEEP_SIGMAS,
              means: Sequence[float] = (0.0, 3.0)) -> List[Dict]:
    """:func:`sweep_feature_statistics` for ACM (both inits) and the registered peers."""
    from ..modeling.acm import ACM

    factories = {"ACM authors": lambda: ACM(channels, groups), "ACM identity": lambda: ACM(channels, groups, init="identity")}
    factories.update({name: _peer_factory(name, channels) for name in _registered_peers()})
    return sweep_feature_statistics(factories, channels, size, sigmas, means)


def run_scenario(name: str, pretrained: Optional[str], quick: bool = False) -> Dict:
    """One scenario of :data:`SCENARIOS`: {label: :func:`measure_start` entry}, plus
    "scaled": :func:`jacobian_gains` of each authors-init ACM at its real X times 3 and 10."""
    from ..config import get_acm_cfg

    if name.startswith("pretrained"):
        if not pretrained:
            raise ValueError(f"scenario {name!r} needs the trained plain checkpoint (--pretrained)")
        size = "384" if name == "pretrained_384" else "96"
        opts = ["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.FREEZE_AT", "2", "INPUT.MIN_SIZE_TRAIN", f"({size},)",
                "INPUT.MAX_SIZE_TRAIN", size] + coco_recipe(4)
        config, count, rates = R18_CONFIG, 4, None
        labels = ["plain", "ACM authors", "ACM identity"] + _registered_peers()
        if name == "pretrained_384":
            labels = ["plain", "ACM authors", "ACM identity", "SE"]
    else:
        opts = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "DATASETS.TRAIN", "('acm_synthetic_train',)",
                "INPUT.MIN_SIZE_TRAIN", "(320,)", "INPUT.MAX_SIZE_TRAIN", "320"] + coco_recipe(2)
        config, count, rates = R50_CONFIG, 2, [1e-5] * 3  # the check: SGD, lr 1e-5, 3 steps
        labels = ["plain", "ACM authors", "ACM identity", "SE"]
        pretrained = None
    if quick:
        opts += ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64"]
        count, labels = 2, labels[:3]
    cfg = get_acm_cfg(config, opts)
    inputs = training_inputs(cfg, count)
    calibrate = inputs[:1] if name == "random_calibrated" else None
    state = plain_start(config, opts, pretrained, calibrate_on=calibrate)
    results = measure_start(config, opts, state, {label: module_overrides(label) for label in labels}, inputs,
                            steps=3, learning_rates=rates, jacobian=name != "random_default" and not quick, iterations=8)
    # The same modules on their real X scaled up: the gain as a function of sigma in this network.
    acm_cfg = get_acm_cfg(config, list(opts) + ["MODEL.RESNETS.NORM", "FrozenBN"] + module_overrides("ACM authors"))
    model = build_from_state(acm_cfg, state)
    model.train()
    scaled = []
    with probe_context_modules(model) as records, torch.no_grad():
        _loss(model, inputs[:1])
    modules = named_context_modules(model)
    for module_name, x, _ in records:
        for factor in (1.0, 3.0, 10.0) if not quick else (1.0,):
            row = {"module": module_name, "factor": factor}
            row.update(jacobian_gains(modules[module_name], factor * x, iterations=8))
            scaled.append(row)
    results["scaled"] = scaled
    results["description"] = SCENARIOS[name]
    return results


def _plot_sweep(rows: List[Dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for ax, key, title in zip(axes, ("top", "coherent", "white"), (
            "largest singular value of dY/dX", "gain on a spatially constant dY", "gain on a white-noise dY")):
        for label in dict.fromkeys(r["module"] for r in rows):
            mine = [r for r in rows if r["module"] == label and r["mean_set"] == 0.0]
            ax.plot([r["sigma_set"] for r in mine], [r[key] for r in mine], marker="o", label=label)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("spatial std sigma of X")
        ax.set_title(title, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("‖J^T u‖ / ‖u‖")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_modules(scenarios: Dict[str, Dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in SCENARIOS if n in scenarios]
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names):
        labels = [label for label, v in scenarios[name].items() if isinstance(v, dict) and v.get("modules")]
        for label in labels:
            ratios = [r["grad_ratio"] for r in scenarios[name][label]["modules"]]
            ax.plot(range(len(ratios)), ratios, marker="o", label=label)
        ax.set_yscale("log")
        ax.set_xlabel("module (forward order)")
        ax.set_title(name, fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("‖dL/dX‖ / ‖dL/dY‖")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_training(runs: List[Dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for label in dict.fromkeys(r["label"] for r in runs):
        curves = [r["curve"] for r in runs if r["label"] == label and r["curve"]["iteration"]]
        if not curves:
            continue
        length = min(len(c["iteration"]) for c in curves)
        its = curves[0]["iteration"][:length]
        mean = [statistics.fmean(c["total_loss"][i] for c in curves) for i in range(length)]
        ax.plot(its, mean, marker=".", label=f"{label} ({len(curves)} seeds)")
        for c in curves:
            ax.plot(c["iteration"], c["total_loss"], alpha=0.2, color=ax.lines[-1].get_color())
    ax.set_xlabel("iteration")
    ax.set_ylabel("total training loss (20-iteration median)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan"
    if isinstance(value, float) and not math.isfinite(value):
        return "inf"
    return f"{value:.3g}"


def report_markdown(results: Dict, runs: Optional[List[Dict]] = None) -> str:
    """The tables of docs/initialisation.md from :func:`run_sweep` / :func:`run_scenario`
    results (``results["sweep"]``, ``results[<scenario>]``) and training ``runs``."""
    lines: List[str] = []
    if "sweep" in results:
        rows = results["sweep"]
        lines += ["### Single modules on Gaussian X (C = %d, %d x %d)" % (results.get("sweep_channels", 0), results.get("sweep_size", 0), results.get("sweep_size", 0)), "",
                  "top / coherent / white gain of J^T; columns: the spatial std sigma of X; rows with "
                  "\"mean 3\": per-channel means drawn as N(0, 3^2) added.", ""]
        sigmas = sorted({r["sigma_set"] for r in rows})
        lines.append("| module | means | " + " | ".join(f"sigma {s:g}" for s in sigmas) + " |")
        lines.append("|---|---|" + "---|" * len(sigmas))
        for label in dict.fromkeys(r["module"] for r in rows):
            for mean in sorted({r["mean_set"] for r in rows}):
                cells = []
                for s in sigmas:
                    r = next(r for r in rows if r["module"] == label and r["mean_set"] == mean and r["sigma_set"] == s)
                    cells.append(f"{_fmt(r['top'])} / {_fmt(r['coherent'])} / {_fmt(r['white'])}")
                lines.append(f"| {label} | {mean:g} | " + " | ".join(cells) + " |")
        lines.append("")
    for name in SCENARIOS:
        if name not in results:
            continue
        scenario = results[name]
        lines += [f"### {name}: {scenario['description']}", ""]
        lines.append("| start | backbone gradient norm | x plain | modules' own gradient norm | loss before step 1, 2, 3 and after | per-module ‖dL/dX‖ / ‖dL/dY‖ | per-module sigma of X |")
        lines.append("|---|---|---|---|---|---|---|")
        plain = scenario.get("plain", {}).get("gradients", {}).get("all", math.nan)
        for label, entry in scenario.items():
            if not isinstance(entry, dict) or "gradients" not in entry:
                continue
            g = entry["gradients"]["all"]
            lines.append(
                f"| {label} | {_fmt(g)} | {_fmt(g / plain if plain else math.nan)} | {_fmt(entry['gradients']['context']) if 'context' in entry['gradients'] else 'not measured'} | "
                + ", ".join(_fmt(v) for v in entry["losses"]) + " | "
                + " ".join(_fmt(r["grad_ratio"]) for r in entry["modules"]) + " | "
                + " ".join(_fmt(r["sigma"]) for r in entry["modules"]) + " |"
            )
        jac = [(label, r) for label, entry in scenario.items() if isinstance(entry, dict) and "modules" in entry
               for r in entry["modules"] if "top" in r]
        if jac:
            lines += ["", "Jacobian at each module's X (first image):", "",
                      "| start | module | C | HW | sigma | mean | forward ‖Y-X‖/‖X‖ | white | coherent | top | map flatness | mean P |",
                      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for label, r in jac:
                lines.append(
                    f"| {label} | {r['module'].replace('backbone.bottom_up.', '')} | {r['channels']} | {r['hw']} | {_fmt(r['sigma'])} | "
                    f"{_fmt(r['mean'])} | {_fmt(r['forward'])} | {_fmt(r['white'])} | {_fmt(r['coherent'])} | {_fmt(r['top'])} | "
                    f"{_fmt(r.get('flatness'))} | {_fmt(r.get('mean_P'))} |"
                )
        if scenario.get("scaled"):
            factors = sorted({r["factor"] for r in scenario["scaled"]})
            lines += ["", "ACM (authors' init) at its real X times a factor: top / coherent gain", "",
                      "| module | " + " | ".join(f"X x {f:g}" for f in factors) + " |", "|---|" + "---|" * len(factors)]
            for module in dict.fromkeys(r["module"] for r in scenario["scaled"]):
                cells = [next(r for r in scenario["scaled"] if r["module"] == module and r["factor"] == f) for f in factors]
                lines.append(f"| {module.replace('backbone.bottom_up.', '')} | " + " | ".join(
                    f"{_fmt(c['top'])} / {_fmt(c['coherent'])}" for c in cells) + " |")
        lines.append("")
    if runs:
        lines += ["### Training from the pretrained start (mean ± sample std over seeds)", "",
                  "| start | seeds | diverged | AP box | AP mask | first logged loss (iter 20) | last logged loss |", "|---|---|---|---|---|---|---|"]
        for label in dict.fromkeys(r["label"] for r in runs):
            mine = [r for r in runs if r["label"] == label]
            ok = [r for r in mine if "failed" not in r]

            def ms(values):
                values = [v for v in values if v is not None and math.isfinite(v)]
                if not values:
                    return "n/a"
                return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"

            lines.append(
                f"| {label} | {len(mine)} | {len(mine) - len(ok)} | {ms([r['metrics'].get('bbox/AP') for r in ok])} | "
                f"{ms([r['metrics'].get('segm/AP') for r in ok])} | "
                f"{ms([r['curve']['total_loss'][0] for r in mine if r['curve']['total_loss']])} | "
                f"{ms([r['curve']['total_loss'][-1] for r in mine if r['curve']['total_loss']])} |"
            )
        lines.append("")
    return "\n".join(lines)


def write_report(results: Dict, out_dir, images_dir=None, runs: Optional[List[Dict]] = None) -> Dict[str, Path]:
    """Write ``init_gain.json`` and ``init_gain.md`` to ``out_dir`` and the figures
    (``init_gain_sweep.png``, ``init_gain_modules.png``, ``init_training.png``, those whose
    data there is) to ``images_dir`` (default ``out_dir``). Returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    images = Path(images_dir) if images_dir else out
    images.mkdir(parents=True, exist_ok=True)
    written = {"json": out / "init_gain.json", "markdown": out / "init_gain.md"}
    written["json"].write_text(json.dumps({"results": results, "runs": runs or []}, indent=1))
    written["markdown"].write_text(report_markdown(results, runs))
    if results.get("sweep"):
        written["sweep"] = images / "init_gain_sweep.png"
        _plot_sweep(results["sweep"], written["sweep"])
    if any(name in results for name in SCENARIOS):
        written["modules"] = images / "init_gain_modules.png"
        _plot_modules(results, written["modules"])
    if runs:
        written["training"] = images / "init_training.png"
        _plot_training(runs, written["training"])
    return written
