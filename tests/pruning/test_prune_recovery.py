"""Recovery after pruning: label-free selection, BatchNorm re-estimation, budgets, augmentation."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from pipeline.errors import BadInput
from pipeline.pruning.augment import AugmentConfig, Augmenter
from pipeline.pruning.batchnorm import reestimate_batchnorm
from pipeline.pruning.finetune import FinetuneSettings, finetune, lr_factor
from pipeline.pruning.validation import Reference, score, split_holdout
from pipeline.sources.data import DataBundle, TensorSplit
from pipeline.stages.prune import PruneConfig, PruneStage


def _teacher_and_student():
    """An MLP teacher with confident, varied decisions, and a noisy copy that agrees only partly."""
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(256, 32), torch.nn.ReLU(),
                                  torch.nn.Linear(32, 10)).eval()
    with torch.no_grad():
        teacher[3].weight.mul_(8.0)
    student = copy.deepcopy(teacher)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.5 * p.abs().mean() * torch.randn(p.shape, generator=g))
    return teacher, student


def _unlabelled(n: int = 96, seed: int = 0) -> TensorSplit:
    g = torch.Generator().manual_seed(seed)
    return TensorSplit("train", torch.randn(n, 1, 16, 16, generator=g), None, batch_size=16)


def test_destructive_lr_returns_candidate_zero():
    teacher, student = _teacher_and_student()
    train, held = split_holdout(_unlabelled(), 0.25)
    ref = Reference.build(teacher, held, "held-out")
    before = copy.deepcopy(student.state_dict())
    out = finetune(student, teacher, train, ref, FinetuneSettings(epochs=3, lr=50.0, warmup=0.0, patience=5))
    json.dumps(out, allow_nan=False)  # diverged candidates are still valid JSON
    # the destructive lr really did destroy the later candidates ...
    assert min(h["agreement"] for h in out["history"][1:]) < out["candidate_zero"]["agreement"]
    # ... and the input model came back unchanged
    assert out["best_step"] == 0 and out["selected_on"] == "agreement"
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert score(student, ref)["agreement"] == out["candidate_zero"]["agreement"]


def test_label_free_finetune_never_lowers_agreement_and_records_the_curve():
    teacher, student = _teacher_and_student()
    train, held = split_holdout(_unlabelled(128), 0.25)
    ref = Reference.build(teacher, held, "held-out")
    out = finetune(student, teacher, train, ref, FinetuneSettings(steps=24, lr=0.01, eval_every=6, patience=10))
    assert [h["step"] for h in out["history"]] == [0, 6, 12, 18, 24]
    assert out["stopped"] == "budget" and out["steps_run"] == 24
    assert out["best_step"] > 0  # distillation does help here ...
    assert out["best"]["agreement"] > out["candidate_zero"]["agreement"]
    assert out["history"][-1]["kl"] < out["candidate_zero"]["kl"]
    assert score(student, ref)["agreement"] == out["best"]["agreement"]


def test_early_stopping_counts_evaluations():
    teacher, student = _teacher_and_student()
    train, held = split_holdout(_unlabelled(), 0.25)
    ref = Reference.build(teacher, held, "held-out")
    out = finetune(student, teacher, train, ref, FinetuneSettings(epochs=50, lr=50.0, warmup=0.0, patience=2))
    assert out["stopped"] == "early_stop" and len(out["history"]) == 3  # candidate zero + 2 bad evaluations


def test_minutes_budget_ends_training():
    teacher, student = _teacher_and_student()
    out = finetune(student, teacher, _unlabelled(32), None, FinetuneSettings(minutes=0.002, epochs=1, lr=0.01))
    assert out["stopped"] == "budget" and out["steps_run"] >= 1 and out["selected_on"] is None


def test_lr_schedule_warms_up_then_decays():
    assert lr_factor(0.0, 0.1, "cosine") == 0.0
    assert lr_factor(0.05, 0.1, "cosine") == pytest.approx(0.5)
    assert lr_factor(0.1, 0.1, "cosine") == pytest.approx(1.0)
    assert lr_factor(0.55, 0.1, "cosine") == pytest.approx(0.5)
    assert lr_factor(1.0, 0.1, "cosine") == pytest.approx(0.0, abs=1e-12)
    assert lr_factor(0.9, 0.1, "none") == 1.0


def test_split_holdout_is_disjoint_and_seeded():
    split = TensorSplit("t", torch.arange(20.0).view(20, 1), torch.arange(20), batch_size=4)
    train, held = split_holdout(split, 0.25, seed=3)
    a, b = set(train.x.view(-1).tolist()), set(held.x.view(-1).tolist())
    assert len(b) == 5 and len(a) == 15 and not a & b
    assert held.y.tolist() == [int(v) for v in held.x.view(-1).tolist()]  # labels follow their images
    assert torch.equal(split_holdout(split, 0.25, seed=3)[1].x, held.x)
    assert split_holdout(TensorSplit("one", torch.zeros(1, 1), None), 0.5) is None


def test_batchnorm_reestimation_matches_batch_statistics(tiny_model):
    model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        model.bn1.running_mean.fill_(5.0)
        model.bn1.running_var.fill_(9.0)
    x = torch.randn(32, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    assert reestimate_batchnorm(model, [x[:16], x[16:]]) == 32
    a = model.conv1(x)
    assert torch.allclose(model.bn1.running_mean, a.mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(model.bn1.running_var, a.var((0, 2, 3), unbiased=True), rtol=0.05)
    assert not model.training and model.bn1.momentum == tiny_model.bn1.momentum
    kept = model.bn1.running_mean.clone()
    assert reestimate_batchnorm(model, iter([])) == 0  # no images: statistics left as they were
    assert torch.equal(model.bn1.running_mean, kept)


def test_augmenter_makes_seeded_distinct_views():
    x = torch.randn(4, 3, 24, 24, generator=torch.Generator().manual_seed(0))
    a = Augmenter(AugmentConfig(), seed=1)(x)
    b = Augmenter(AugmentConfig(), seed=1)(x)
    assert a.shape == x.shape and torch.equal(a, b)
    assert not torch.allclose(a, x)
    state = torch.get_rng_state()
    Augmenter(AugmentConfig(crop_scale=(1.0, 1.0), flip=False, color_jitter=0.0))(x)
    assert torch.equal(state, torch.get_rng_state())  # the caller's random stream is untouched


@pytest.mark.parametrize("finetune_cfg", [{"steps": 0}, {"minutes": 0}, {"augment": {"rotate": 10}},
                                          {"augment": {"crop_scale": [0.9, 0.2]}}])
def test_bad_finetune_config_is_rejected(finetune_cfg):
    with pytest.raises(ValidationError):
        PruneConfig.model_validate({"macs": 0.3, "finetune": finetune_cfg})


def test_bad_budget_and_augment_are_exit_2_through_the_recipe(tmp_path):
    from pipeline.recipe import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("name: r\nmodel: {source: 'builtin:digits_cnn'}\n"
                    "stages:\n  - prune: {macs: 0.3, finetune: {steps: 0, augment: {rotate: 5}}}\n")
    with pytest.raises(BadInput) as err:
        load_recipe(path)
    assert "\n" not in str(err.value) and "steps" in str(err.value)


def test_stage_reports_agreement_bn_and_curve_without_labels(tiny_model, make_ctx):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1, 16, 16, generator=g)
    split = TensorSplit("u", x, None, batch_size=16)
    ctx = make_ctx(tiny_model, DataBundle(calibration=split, eval=split, train=split))
    cfg = PruneConfig.model_validate({"macs": 0.4, "bn_reestimate": True,
                                      "finetune": {"steps": 8, "eval_every": 4, "lr": 0.01,
                                                                "augment": {"crop_scale": [0.5, 1.0]},
                                                                "feature_layers": ["conv2"]}})
    m = PruneStage().run(ctx, cfg).metrics
    ag = m["agreement"]
    assert ag["source"] == "data.eval" and ag["samples"] == 96
    assert all(0.0 <= ag[k] <= 1.0 for k in ("after_prune", "after_reconstruct", "after_bn", "after_finetune"))
    assert m["reconstruct"]["layers"] == ["fc"] and m["reconstruct"]["images"] == 96  # all calibration images (< 128)
    assert m["batchnorm"]["images"] == 96
    ft = m["finetune"]
    assert ft["selected_on"] == "agreement" and ft["history"][0]["step"] == 0
    assert ft["validation"]["samples"] == 10 and ft["best"]["agreement"] >= ft["candidate_zero"]["agreement"]
    assert m["accuracy"]["after_finetune"] is None  # no labels anywhere


def test_stage_bad_train_data_is_bad_input(tiny_model, make_ctx):
    cal = TensorSplit("c", torch.randn(16, 1, 16, 16), None)
    empty = TensorSplit("t", torch.zeros(0, 1, 16, 16), None)
    wrong = TensorSplit("t", torch.randn(8, 3, 16, 16), None)  # the model takes 1 channel
    cfg = PruneConfig.model_validate({"macs": 0.3, "finetune": {"steps": 2}})
    with pytest.raises(BadInput, match="no images"):
        PruneStage().run(make_ctx(tiny_model, DataBundle(calibration=cal, train=empty)), cfg)
    with pytest.raises(BadInput, match=r"cannot run on data.train images of shape \[3, 16, 16\]"):
        PruneStage().run(make_ctx(tiny_model, DataBundle(calibration=cal, train=wrong)), cfg)
    bad_layer = PruneConfig.model_validate({"macs": 0.3, "finetune": {"steps": 2, "feature_layers": ["nope"]}})
    with pytest.raises(BadInput, match="'nope'"):
        PruneStage().run(make_ctx(tiny_model, DataBundle(calibration=cal, train=cal)), bad_layer)


def test_unlabelled_image_folder(tmp_path):
    from PIL import Image

    from pipeline.recipe_models import ImageFolderData
    from pipeline.sources.data import build_split

    rng = np.random.default_rng(0)
    for i in range(5):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
    split = build_split(ImageFolderData(source="imagefolder", path=str(tmp_path), batch_size=2), "train",
                        [1, 3, 16, 16])
    assert not split.has_labels and len(split) == 5
    batches = list(split.batches())
    assert [b[0].shape[0] for b in batches] == [2, 2, 1] and all(y is None for _, y in batches)
    train, held = split_holdout(split, 0.4)
    assert len(train) == 3 and len(held) == 2 and not set(train.files) & set(held.files)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(BadInput, match="no images"):
        build_split(ImageFolderData(source="imagefolder", path=str(empty)), "train", [1, 3, 16, 16])


def test_sensitivity_probe_masks_like_pruning_and_spares_the_sensitive_layer(tiny_model):
    """Masking a group must change the output exactly as removing it does; a layer whose channels
    the output depends on heavily gets a smaller weight than one that barely matters."""
    import torch_pruning as tp

    from pipeline.pruning.engine import PruneSettings, default_protection, prune_copy
    from pipeline.pruning.sensitivity import allocation_weights, measure_sensitivity

    model = copy.deepcopy(tiny_model)
    x = torch.randn(32, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    reestimate_batchnorm(model, [x])
    with torch.no_grad():
        model.fc.weight.mul_(10.0)
        model.conv3.weight.mul_(10.0)  # conv3 drives the logits: masking it must hurt most
    ex = x[:1]
    protect = default_protection(model, ex)
    rows = measure_sensitivity(model, ex, x, lambda m: tp.importance.MagnitudeImportance(p=2),
                               list(protect.reasons), probe=0.5)
    by = {r["layer"]: r for r in rows}
    assert set(by) == {"conv1", "conv3"}  # conv2 is coupled to conv1 by the residual add; fc is protected
    assert by["conv3"]["probe_channels"] == 8 and by["conv1"]["probe_channels"] == 4
    assert all(r["macs_saved"] > 0 and r["kl"] >= 0 for r in rows)
    w = allocation_weights(rows)
    assert w["conv3"] < w["conv1"] and sum(w.values()) / len(w) == pytest.approx(1.0, abs=1e-3)
    # the probe's damage equals the damage of really removing those channels
    pruned = prune_copy(model, ex, 0.0, PruneSettings(criterion="l2", layer_weights=(("conv3", 0.5),)),
                        copy.deepcopy(protect))
    assert pruned.conv3.out_channels == 16  # ratio 0 * weight: nothing pruned
    pruned = prune_copy(model, ex, 1.0, PruneSettings(criterion="l2", layer_weights=(("conv3", 0.5),),
                                                      max_layer_ratio=0.5), copy.deepcopy(protect))
    assert pruned.conv3.out_channels == 8
    from pipeline.pruning.validation import logits

    real = torch.nn.functional.kl_div(torch.log_softmax(logits(pruned, x), 1), torch.log_softmax(logits(model, x), 1),
                                      log_target=True, reduction="batchmean")
    assert float(real) == pytest.approx(by["conv3"]["kl"], rel=1e-3, abs=1e-5)


def test_stage_sensitivity_allocation_and_comparison(tiny_model, tiny_data, make_ctx):
    ctx = make_ctx(tiny_model, tiny_data)
    cfg = PruneConfig.model_validate({"macs": 0.3, "allocation": "sensitivity", "compare_allocations": True})
    m = PruneStage().run(ctx, cfg).metrics
    assert m["allocation"] == "sensitivity" and {r["layer"] for r in m["sensitivity"]} == {"conv1", "conv3"}
    assert [r["allocation"] for r in m["allocation_comparison"]] == ["uniform", "global", "sensitivity"]
    assert all(0 <= r["agreement_after_bn"] <= 1 for r in m["allocation_comparison"])
    with pytest.raises(ValidationError):
        PruneConfig.model_validate({"macs": 0.3, "allocation": "sensitivity", "global": True})


def test_reconstruction_restores_a_pruned_linear_layer_exactly():
    """A Linear layer that lost inputs the others can express is refitted to the teacher's output."""
    from pipeline.pruning.reconstruct import reconstruct

    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 4)).eval()
    with torch.no_grad():  # hidden unit 5 = unit 0 + unit 1: removing it loses nothing
        teacher[0].weight[5] = teacher[0].weight[0] + teacher[0].weight[1]
        teacher[0].bias[5] = teacher[0].bias[0] + teacher[0].bias[1]
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student[0] = torch.nn.Linear(8, 5)
        student[0].weight.copy_(teacher[0].weight[:5])
        student[0].bias.copy_(teacher[0].bias[:5])
        student[1] = torch.nn.Linear(5, 4)
        student[1].weight.copy_(teacher[1].weight[:, :5])
        student[1].bias.copy_(teacher[1].bias)
    x = torch.randn(256, 8)
    before = (student(x) - teacher(x)).abs().max()
    assert reconstruct(student, teacher, x, {"0": [0, 1, 2, 3, 4]}) == ["1"]
    after = (student(x) - teacher(x)).abs().max()
    assert before > 0.05 and after < 0.05 * before


def test_iterative_rounds_reach_the_target_and_report_each_round(tiny_model, tiny_data, make_ctx):
    ctx = make_ctx(tiny_model, tiny_data)
    cfg = PruneConfig.model_validate({"macs": 0.4, "rounds": 2, "finetune": {"steps": 4, "eval_every": 2}})
    m = PruneStage().run(ctx, cfg).metrics
    assert [r["round"] for r in m["rounds"]] == [1, 2]
    assert all(r["finetune_steps"] == 2 for r in m["rounds"])
    assert m["reduction"]["macs"] >= 0.4 - 0.05
    assert m["agreement"]["after_finetune"] is not None
    bn = m["batchnorm"]  # bn_reestimate null after reconstruction: decided by agreement, recorded
    d = bn["decided_on"]
    assert d["images"] == 64 and bn["applied"] == (d["agreement_with"] > d["agreement_without"])
    with pytest.raises(ValidationError):
        PruneConfig.model_validate({"macs": 0.4, "rounds": 0})


def test_ridge_is_chosen_on_held_out_images():
    """Plenty of exact rows: the weakest ridge; a few noisy images for many inputs: a strong one
    (the classifier of a pruned network sees one row per image and would fit them exactly)."""
    from pipeline.pruning.reconstruct import RIDGE_GRID, choose_ridge

    g = torch.Generator().manual_seed(0)
    w_true, w0 = torch.randn(40, 3, generator=g), torch.zeros(40, 3)
    x = torch.randn(4000, 40, generator=g)
    assert choose_ridge(x, x @ w_true, w0, torch.arange(4000) // 10) == RIDGE_GRID[0]
    x = torch.randn(24, 40, generator=g)
    noisy = torch.randn(24, 3, generator=g)  # nothing to learn: stay at w0
    assert choose_ridge(x, noisy, w0, torch.arange(24)) >= 1.0


def test_reconstruction_samples_positions_the_same_in_teacher_and_student():
    """A 1x1 conv whose lost input is a sum of two kept ones is restored from sampled positions."""
    from pipeline.pruning import reconstruct as rec

    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 1), torch.nn.Conv2d(6, 4, 1)).eval()
    with torch.no_grad():
        teacher[0].weight[5] = teacher[0].weight[0] + teacher[0].weight[1]
        teacher[0].bias[5] = teacher[0].bias[0] + teacher[0].bias[1]
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        student[0] = torch.nn.Conv2d(3, 5, 1)
        student[0].weight.copy_(teacher[0].weight[:5]), student[0].bias.copy_(teacher[0].bias[:5])
        student[1] = torch.nn.Conv2d(5, 4, 1)
        student[1].weight.copy_(teacher[1].weight[:, :5]), student[1].bias.copy_(teacher[1].bias)
    x = torch.randn(40, 3, 16, 16)
    before = (student(x) - teacher(x)).abs().max()
    old = rec.MAX_ROWS
    rec.MAX_ROWS = 400  # 10 of 256 positions per image; the teacher runs in chunks of 8 images
    try:
        assert rec.reconstruct(student, teacher, x, chunk=8) == ["1"]
    finally:
        rec.MAX_ROWS = old
    assert (student(x) - teacher(x)).abs().max() < 0.01 * before


def test_reference_leaves_out_the_images_a_recovery_step_fitted():
    from pipeline.pruning.validation import Reference

    x = torch.randn(10, 3, 4, 4)
    ref = Reference(x, None, torch.randn(10, 5), "data.train (held-out 10)")
    out = ref.excluding(torch.cat([x[2:5], torch.randn(3, 3, 4, 4)]), "the reconstruction's images")
    assert len(out) == 7 and torch.equal(out.x, torch.cat([x[:2], x[5:]]))
    assert torch.equal(out.teacher_logits, torch.cat([ref.teacher_logits[:2], ref.teacher_logits[5:]]))
    assert "3 of the reconstruction's images left out" in out.source
    assert ref.excluding(x, "all") is ref  # nothing would be left: unchanged


def test_feature_adapter_starts_at_the_least_squares_map():
    """A student layer whose channels span the teacher's starts with (near) zero feature loss."""
    from pipeline.pruning.finetune import FeatureDistiller

    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 6, 1), torch.nn.ReLU()).eval()
    student = copy.deepcopy(teacher)
    with torch.no_grad():  # the student computes 4 channels; the teacher's 6 are linear in them
        student[0] = torch.nn.Conv2d(3, 4, 1)
        student[0].weight.copy_(teacher[0].weight[:4]), student[0].bias.copy_(teacher[0].bias[:4])
        mix = torch.randn(6, 4)
        teacher[0].weight.copy_((mix @ student[0].weight.view(4, 3)).view(6, 3, 1, 1))
        teacher[0].bias.copy_(mix @ student[0].bias)
    teacher[1] = student[1] = torch.nn.Identity()
    x = torch.randn(8, 3, 5, 5)
    fd = FeatureDistiller(student, teacher, ("0",), x)
    try:
        student(x), teacher(x)
        assert float(fd.loss().detach()) < 1e-3
    finally:
        fd.close()
