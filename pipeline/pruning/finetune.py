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


def lr_factor(progress: float, warmup: float, schedule: str) -> float:
    """Linear warm-up over `warmup` of the budget, then cosine to zero (or constant)."""
    progress = min(max(progress, 0.0), 1.0)
    if warmup > 0 and progress < warmup:
        return progress / warmup
    if schedule != "cosine":
        return 1.0
    rest = (progress - warmup) / max(1.0 - warmup, 1e-9)
    return 0.5 * (1.0 + math.cos(math.pi * rest))


class FeatureDistiller:
    """MSE between student and teacher outputs of named layers, through a learned 1x1 adapter.

    The student's layers are narrower after pruning; the adapter maps its channels onto the
    teacher's (FitNets). Adapters are trained with the student and thrown away afterwards.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, names: tuple[str, ...], example: torch.Tensor) -> None:
        s_mods, t_mods = dict(student.named_modules()), dict(teacher.named_modules())
        missing = [n for n in names if n not in s_mods or n not in t_mods]
        if missing:
            raise BadInput(f"prune.finetune.feature_layers: no layer named {', '.join(map(repr, missing))} in the model")
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


def finetune(model: nn.Module, teacher: nn.Module | None, train: DataSplit, ref: Reference | None,
             settings: FinetuneSettings, console: Any = None) -> dict[str, Any]:
    """Fine-tune `model` in place and load the selected candidate; returns the curve and the choice.

    Returns {steps_run, epochs_run, best_step, best_epoch, stopped, selected_on, candidate_zero, best,
    history: [{step, epoch, loss, lr, agreement, kl, val_acc}]} (history[0] is candidate zero).
    """
    s = settings
    if not s.distill and not train.has_labels:
        raise BadInput("prune.finetune: data.train has no labels, so distill must be true")
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    torch.manual_seed(s.seed)
    teacher = teacher.eval() if (s.distill and teacher is not None) else None
    features = None
    if s.feature_layers and teacher is not None:
        features = FeatureDistiller(model, teacher, s.feature_layers, train.first_batch()[0][:2])
    params = [p for p in model.parameters() if p.requires_grad]
    if features is not None:
        params += list(features.adapters.parameters())
    opt = (torch.optim.Adam(params, lr=s.lr) if s.optimizer == "adam"
           else torch.optim.SGD(params, lr=s.lr, momentum=0.9, weight_decay=1e-4))
    steps_per_epoch = max(1, -(-len(train) // max(train.batch_size, 1)))
    total_steps = s.steps if s.steps is not None else (None if s.minutes is not None else s.epochs * steps_per_epoch)
    seconds = None if s.minutes is None else s.minutes * 60.0
    eval_every = s.eval_every or steps_per_epoch
    augment = Augmenter(s.augment, s.seed) if s.augment is not None else None

    def evaluate() -> dict[str, float | None]:
        return score(model, ref) if ref is not None else {"agreement": None, "kl": None, "val_acc": None}

    def key(m: dict[str, float | None]) -> tuple[float, float]:
        primary = m["val_acc"] if m["val_acc"] is not None else m["agreement"]
        return (primary or 0.0, -(m["kl"] if m["kl"] is not None else math.inf))

    zero = evaluate()
    history: list[dict[str, Any]] = [{"step": 0, "epoch": 0, "loss": None, "lr": 0.0, **zero}]
    best_key, best_state, best_step = key(zero), copy.deepcopy(model.state_dict()), 0
    bad, step, epoch, stopped = 0, 0, 0, "budget"
    start = time.monotonic()

    def progress_now(next_step: int) -> float:
        p = 0.0
        if total_steps:
            p = max(p, next_step / total_steps)
        if seconds:
            p = max(p, (time.monotonic() - start) / seconds)
        return p

    bar = Progress(TextColumn("fine-tune {task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                   TimeRemainingColumn(), console=console, transient=True, disable=console is None)
    done = False
    running, seen = 0.0, 0
    from pipeline.progress import Ticker  # a CI log gets timestamped lines, not a bar it never sees

    ticker = Ticker(console, "fine-tune", total_steps, "steps") if (
        console is not None and not console.is_terminal) else None
    with bar:
        task = bar.add_task("", total=total_steps or 100, info="")
        while not done:
            epoch += 1
            model.train()
            for x, y in train.batches():
                if augment is not None:
                    x = augment(x)
                factor = lr_factor(progress_now(step + 1), s.warmup, s.schedule)
                for g in opt.param_groups:
                    g["lr"] = s.lr * factor
                with torch.no_grad():
                    t_out = teacher(x) if teacher is not None else None
                loss = distill_loss(model(x), t_out, y, s.temperature, s.alpha)
                if features is not None:
                    loss = loss + s.feature_weight * features.loss()
                opt.zero_grad()
                loss.backward()
                opt.step()
                step += 1
                running += loss.item() * len(x)
                seen += len(x)
                done = progress_now(step) >= 1.0
                bar.update(task, completed=min(step, total_steps) if total_steps else 100 * progress_now(step),
                           description=f"step {step}", info=f"loss {running / max(seen, 1):.4f}")
                if ticker is not None:
                    ticker.advance(1)
                if step % eval_every == 0 or done:
                    m = evaluate()
                    mean_loss = running / max(seen, 1)
                    history.append({"step": step, "epoch": epoch,
                                    "loss": round(mean_loss, 6) if math.isfinite(mean_loss) else None,
                                    "lr": round(s.lr * factor, 8), **m})
                    running, seen = 0.0, 0
                    model.train()
                    eligible = ref is None or (m["agreement"] or 0.0) >= (zero["agreement"] or 0.0)
                    if ref is None or (eligible and key(m) > best_key):
                        best_key, best_step, bad = key(m), step, 0
                        best_state = copy.deepcopy(model.state_dict())
                    else:
                        bad += 1
                        if s.patience is not None and bad >= s.patience:
                            stopped, done = "early_stop", True
                if done:
                    break
    if features is not None:
        features.close()
    model.load_state_dict(best_state)
    model.eval()
    chosen = next(h for h in history if h["step"] == best_step)
    return {"steps_run": step, "epochs_run": epoch, "best_step": best_step, "best_epoch": chosen["epoch"],
            "stopped": stopped, "seconds": round(time.monotonic() - start, 2),
            "selected_on": None if ref is None else ("val_acc" if ref.y is not None else "agreement"),
            "validation": None if ref is None else {"source": ref.source, "samples": len(ref)},
            "candidate_zero": zero, "best": {k: chosen[k] for k in ("agreement", "kl", "val_acc")},
            "history": history}
