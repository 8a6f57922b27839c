"""Recover a pruned model: distillation from the original, with label-free model selection.

Loss = alpha * T^2 * KL(student/T || teacher/T) + (1 - alpha) * CE(labels) (+ optional feature-map
terms); without labels only distillation is used. The budget is epochs, steps or minutes, with a
linear warm-up and a cosine decay over whichever budget ends first.

Selection never needs labels: every `eval_every` steps the student is scored against the teacher
on held-out images (`validation.Reference`: agreement, KL, and accuracy when labels exist). The
un-fine-tuned model is candidate zero, and a candidate is eligible only if its agreement is at
least candidate zero's, so fine-tuning can never hand back a model that agrees with the teacher
less than the one it was given. Early stopping counts evaluations without improvement.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import BadInput
from pipeline.pruning.augment import AugmentConfig, Augmenter
from pipeline.pruning.validation import Reference, score
from pipeline.sources.data import DataSplit


@torch.no_grad()
def accuracy(model: nn.Module, split: DataSplit | None, max_batches: int | None = None) -> float | None:
    """Top-1 accuracy on a labelled split (None when the split is missing or unlabelled)."""
    if split is None or not split.has_labels:
        return None
    was_training = model.training
    model.eval()
    correct = total = 0
    for i, (x, y) in enumerate(split.batches()):
        if max_batches is not None and i >= max_batches:
            break
        if y is None:
            return None
        out = model(x)
        correct += int((out.argmax(1) == y).sum())
        total += int(y.numel())
    model.train(was_training)
    return correct / total if total else None


def distill_loss(student: torch.Tensor, teacher: torch.Tensor | None, y: torch.Tensor | None,
                 temperature: float, alpha: float) -> torch.Tensor:
    """KD on temperature-softened logits plus task CE; either term drops out when unavailable."""
    terms = []
    if teacher is not None:
        t = temperature
        kd = F.kl_div(F.log_softmax(student / t, 1), F.log_softmax(teacher / t, 1),
                      log_target=True, reduction="batchmean") * t * t
        terms.append((alpha if y is not None else 1.0) * kd)
    if y is not None:
        terms.append((1.0 - alpha if teacher is not None else 1.0) * F.cross_entropy(student, y))
    return sum(terms)  # type: ignore[return-value]


@dataclass(frozen=True)
class FinetuneSettings:
    """How long and how to train; `steps`/`minutes` override `epochs` (the first budget to end wins)."""

    epochs: int = 3
    steps: int | None = None
    minutes: float | None = None
    lr: float = 0.01
    optimizer: str = "sgd"
    schedule: str = "cosine"
    warmup: float = 0.05  # fraction of the budget with a linear lr warm-up
    distill: bool = True
    temperature: float = 4.0
    alpha: float = 0.5
    patience: int | None = None  # evaluations without improvement before stopping; None: use the whole budget
    eval_every: int | None = None  # steps between evaluations; None = once per epoch
    augment: AugmentConfig | None = None
    feature_layers: tuple[str, ...] = ()
    feature_weight: float = 1.0
    seed: int = 0
    freeze_bn: bool = False  # BatchNorm keeps its running statistics (eval mode) while the weights train


def train_mode(model: nn.Module, freeze_bn: bool) -> None:
    """Training mode, except BatchNorm layers when `freeze_bn` (small batches of a few photos would
    otherwise replace statistics estimated on the original training set)."""
    model.train()
    if freeze_bn:
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()


def lr_factor(progress: float, warmup: float, schedule: str) -> float:
    """Linear warm-up over `warmup` of the budget, then cosine to zero (or constant)."""
    progress = min(max(progress, 0.0), 1.0)
    if warmup > 0 and progress < warmup:
        return progress / warmup
    if schedule != "cosine":
        return 1.0
    rest = (progress - warmup) / max(1.0 - warmup, 1e-9)
    return 0.5 * (1.0 + math.cos(math.pi * rest))


@torch.no_grad()
def _fit_adapter(adapter: nn.Module, s: torch.Tensor, t: torch.Tensor) -> None:
    """Start the adapter at the least-squares map from the student's channels to the teacher's on
    the example batch, not at noise: its first gradients then point at what pruning lost."""
    from pipeline.pruning.reconstruct import rows, solve

    w = solve(rows(s).float(), rows(t).float(), torch.zeros(s.shape[1], t.shape[1])).T
    adapter.weight.copy_(w.reshape(adapter.weight.shape).to(adapter.weight.dtype))


class FeatureDistiller:
    """MSE between student and teacher outputs of named layers, through a learned 1x1 adapter.

    The student's layers are narrower after pruning; the adapter maps its channels onto the
    teacher's (FitNets). Adapters are trained with the student and thrown away afterwards.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, names: tuple[str, ...], example: torch.Tensor) -> None:
        from pipeline.pruning.engine import check_layer_names

        for model in (student, teacher):  # the student lacks the layers of blocks that depth pruning dropped
            check_layer_names(model, names, "prune.finetune.feature_layers")
        s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())
        self.s_out: dict[str, torch.Tensor] = {}
        self.t_out: dict[str, torch.Tensor] = {}
        self.hooks = [s_mods[n].register_forward_hook(self._keep(self.s_out, n)) for n in names] + \
                     [t_mods[n].register_forward_hook(self._keep(self.t_out, n)) for n in names]
        with torch.no_grad():
            was = student.training
            student.eval()(example)
            student.train(was)
            teacher(example)
        self.adapters = nn.ModuleDict()
        for i, n in enumerate(names):
            s, t = self.s_out.get(n), self.t_out.get(n)
            if s is None or t is None or s.dim() not in (2, 4) or s.shape[2:] != t.shape[2:]:
                self.close()
                raise BadInput(f"prune.finetune.feature_layers: layer '{n}' does not output a feature map "
                               "of the same spatial size in student and teacher")
            conv = (nn.Conv2d(s.shape[1], t.shape[1], 1, bias=False) if s.dim() == 4
                    else nn.Linear(s.shape[1], t.shape[1], bias=False))
            _fit_adapter(conv, s, t)
            self.adapters[str(i)] = conv
        self.names = names

    @staticmethod
    def _keep(store: dict[str, torch.Tensor], name: str):
        def hook(_m, _i, out):
            if isinstance(out, torch.Tensor):
                store[name] = out
        return hook

    def loss(self) -> torch.Tensor:
        terms = []
        for i, n in enumerate(self.names):
            s, t = self.adapters[str(i)](self.s_out[n]), self.t_out[n].detach()
            terms.append(F.mse_loss(s, t) / t.pow(2).mean().clamp_min(1e-6))
        return sum(terms) / max(len(terms), 1)  # type: ignore[return-value]

    def close(self) -> None:
        for h in self.hooks:
            h.remove()


class _Budget:
    """Progress through whichever budget (steps, or minutes of wall clock) ends first."""

    def __init__(self, train: DataSplit, s: FinetuneSettings) -> None:
        self.steps_per_epoch = max(1, -(-len(train) // max(train.batch_size, 1)))
        self.total_steps = s.steps if s.steps is not None else (
            None if s.minutes is not None else s.epochs * self.steps_per_epoch)
        self.seconds = None if s.minutes is None else s.minutes * 60.0
        self.eval_every = s.eval_every or self.steps_per_epoch
        self.start = time.monotonic()

    def progress(self, next_step: int) -> float:
        p = 0.0
        if self.total_steps:
            p = max(p, next_step / self.total_steps)
        if self.seconds:
            p = max(p, (time.monotonic() - self.start) / self.seconds)
        return p


class _Selection:
    """Keeps the best evaluated state; candidate zero (the input model) sets the floor on agreement."""

    def __init__(self, model: nn.Module, ref: Reference | None, patience: int | None) -> None:
        self.model, self.ref, self.patience = model, ref, patience
        self.zero = self.evaluate()
        self.best_key, self.best_step, self.bad = self.key(self.zero), 0, 0
        self.best_state = copy.deepcopy(model.state_dict())

    def evaluate(self) -> dict[str, float | None]:
        return score(self.model, self.ref) if self.ref is not None else {"agreement": None, "kl": None, "val_acc": None}

    @staticmethod
    def key(m: dict[str, float | None]) -> tuple[float, float]:
        primary = m["val_acc"] if m["val_acc"] is not None else m["agreement"]
        return (primary or 0.0, -(m["kl"] if m["kl"] is not None else math.inf))

    def consider(self, m: dict[str, float | None], step: int) -> bool:
        """Record an evaluation; True when early stopping says to stop."""
        eligible = self.ref is None or (m["agreement"] or 0.0) >= (self.zero["agreement"] or 0.0)
        if self.ref is None or (eligible and self.key(m) > self.best_key):
            self.best_key, self.best_step, self.bad = self.key(m), step, 0
            self.best_state = copy.deepcopy(self.model.state_dict())
            return False
        self.bad += 1
        return self.patience is not None and self.bad >= self.patience


def _optimizer(model: nn.Module, features: FeatureDistiller | None, s: FinetuneSettings) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if features is not None:
        params += list(features.adapters.parameters())
    return (torch.optim.Adam(params, lr=s.lr) if s.optimizer == "adam"
            else torch.optim.SGD(params, lr=s.lr, momentum=0.9, weight_decay=1e-4))


def _step(model: nn.Module, teacher: nn.Module | None, features: FeatureDistiller | None,
          opt: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor | None, s: FinetuneSettings) -> float:
    """One optimizer step on one batch; returns the batch loss."""
    with torch.no_grad():
        t_out = teacher(x) if teacher is not None else None
    loss = distill_loss(model(x), t_out, y, s.temperature, s.alpha)
    if features is not None:
        loss = loss + s.feature_weight * features.loss()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.item())


def _bars(console: Any, total_steps: int | None) -> tuple[Any, Any]:
    """A rich progress bar on a terminal; timestamped lines (Ticker) in a CI log that never sees a bar."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from pipeline.progress import Ticker

    bar = Progress(TextColumn("fine-tune {task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                   TimeRemainingColumn(), console=console, transient=True, disable=console is None)
    ticker = Ticker(console, "fine-tune", total_steps, "steps") if (
        console is not None and not console.is_terminal) else None
    return bar, ticker


def finetune(model: nn.Module, teacher: nn.Module | None, train: DataSplit, ref: Reference | None,
             settings: FinetuneSettings, console: Any = None) -> dict[str, Any]:
    """Fine-tune `model` in place and load the selected candidate; returns the curve and the choice.

    Returns {steps_run, epochs_run, best_step, best_epoch, stopped, selected_on, candidate_zero, best,
    history: [{step, epoch, loss, lr, agreement, kl, val_acc}]} (history[0] is candidate zero).
    """
    s = settings
    if not s.distill and not train.has_labels:
        raise BadInput("prune.finetune: data.train has no labels, so distill must be true")
    torch.manual_seed(s.seed)
    teacher = teacher.eval() if (s.distill and teacher is not None) else None
    features = None
    if s.feature_layers and teacher is not None:
        features = FeatureDistiller(model, teacher, s.feature_layers, train.first_batch()[0][:16])
    opt = _optimizer(model, features, s)
    augment = Augmenter(s.augment, s.seed) if s.augment is not None else None
    sel = _Selection(model, ref, s.patience)
    budget = _Budget(train, s)  # the clock starts after candidate zero is scored
    history: list[dict[str, Any]] = [{"step": 0, "epoch": 0, "loss": None, "lr": 0.0, **sel.zero}]
    step, epoch, stopped, done, running, seen = 0, 0, "budget", False, 0.0, 0
    bar, ticker = _bars(console, budget.total_steps)
    with bar:
        task = bar.add_task("", total=budget.total_steps or 100, info="")
        while not done:
            epoch += 1
            train_mode(model, s.freeze_bn)
            for x, y in train.batches():
                x = augment(x) if augment is not None else x
                factor = lr_factor(budget.progress(step + 1), s.warmup, s.schedule)
                for g in opt.param_groups:
                    g["lr"] = s.lr * factor
                running += _step(model, teacher, features, opt, x, y, s) * len(x)
                step, seen = step + 1, seen + len(x)
                done = budget.progress(step) >= 1.0
                bar.update(task, completed=min(step, budget.total_steps) if budget.total_steps
                           else 100 * budget.progress(step), description=f"step {step}",
                           info=f"loss {running / max(seen, 1):.4f}")
                if ticker is not None:
                    ticker.advance(1)
                if step % budget.eval_every == 0 or done:
                    m, mean_loss = sel.evaluate(), running / max(seen, 1)
                    history.append({"step": step, "epoch": epoch,
                                    "loss": round(mean_loss, 6) if math.isfinite(mean_loss) else None,
                                    "lr": round(s.lr * factor, 8), **m})
                    running, seen = 0.0, 0
                    train_mode(model, s.freeze_bn)
                    if sel.consider(m, step):
                        stopped, done = "early_stop", True
                if done:
                    break
    if features is not None:
        features.close()
    return _result(model, sel, history, step, epoch, stopped, budget, ref)


def _result(model: nn.Module, sel: _Selection, history: list[dict[str, Any]], step: int, epoch: int,
            stopped: str, budget: _Budget, ref: Reference | None) -> dict[str, Any]:
    """Load the selected candidate into `model` and describe the run."""
    model.load_state_dict(sel.best_state)
    model.eval()
    chosen = next(h for h in history if h["step"] == sel.best_step)
    return {"steps_run": step, "epochs_run": epoch, "best_step": sel.best_step, "best_epoch": chosen["epoch"],
            "stopped": stopped, "seconds": round(time.monotonic() - budget.start, 2),
            "selected_on": None if ref is None else ("val_acc" if ref.y is not None else "agreement"),
            "validation": None if ref is None else {"source": ref.source, "samples": len(ref)},
            "candidate_zero": sel.zero, "best": {k: chosen[k] for k in ("agreement", "kl", "val_acc")},
            "history": history}
