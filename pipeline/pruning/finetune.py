"""Recover accuracy after pruning: short fine-tuning with knowledge distillation from the original.

Loss = alpha * T^2 * KL(student/T || teacher/T) + (1 - alpha) * CE(labels). Without labels only
the distillation term is used. Early stopping watches accuracy on a validation split (the calibration data, never the test
split) and the best weights win.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import BadInput
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


def finetune(model: nn.Module, teacher: nn.Module | None, train: DataSplit, eval_split: DataSplit | None,
             *, epochs: int, lr: float, optimizer: str, schedule: str, distill: bool, temperature: float,
             alpha: float, patience: int, console: Any = None) -> dict[str, Any]:
    """Fine-tune `model` in place; returns {epochs_run, best_epoch, history: [{epoch, loss, val_acc}]}."""
    if not distill and not train.has_labels:
        raise BadInput("prune.finetune: data.train has no labels, so distill must be true")
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    teacher = teacher.eval() if (distill and teacher is not None) else None
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (torch.optim.Adam(params, lr=lr) if optimizer == "adam"
           else torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=1e-4))
    steps_per_epoch = max(1, -(-len(train) // max(train.batch_size, 1)))
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
             if schedule == "cosine" else None)
    best_acc, best_state, best_epoch, bad = -1.0, None, 0, 0
    history = []
    progress = Progress(TextColumn("fine-tune {task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                        TimeRemainingColumn(), console=console, transient=True, disable=console is None)
    from pipeline.progress import Ticker  # a CI log gets timestamped lines, not a bar it never sees

    ticker = Ticker(console, "fine-tune", epochs * steps_per_epoch, "steps") if (
        console is not None and not console.is_terminal) else None
    with progress:
        task = progress.add_task("", total=epochs * steps_per_epoch, info="")
        for epoch in range(1, epochs + 1):
            model.train()
            total, n = 0.0, 0
            for x, y in train.batches():
                with torch.no_grad():
                    t_out = teacher(x) if teacher is not None else None
                loss = distill_loss(model(x), t_out, y, temperature, alpha)
                opt.zero_grad()
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                total += loss.item() * len(x)
                n += len(x)
                progress.update(task, advance=1, description=f"epoch {epoch}/{epochs}", info=f"loss {total / n:.4f}")
                if ticker is not None:
                    ticker.advance(1)
            model.eval()
            acc = accuracy(model, eval_split)
            history.append({"epoch": epoch, "loss": total / max(n, 1), "val_acc": acc})
            if acc is None:
                continue
            if acc > best_acc:
                best_acc, best_epoch, bad = acc, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                bad += 1
                if bad >= patience:
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    return {"epochs_run": len(history), "best_epoch": best_epoch or len(history), "history": history}
