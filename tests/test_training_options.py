"""The training options --class-weights, --sampler, --accumulate, --patience and --ema: each
changes what it should and nothing else, and a run using them resumes exactly.

Fast tests check the parts on their own (weights, draws, shards, micro-batch shares, the
patience rule, the moving average); the end-to-end runs (test_vit, 32 px, a few steps) use
the synthetic BreakHis split of ``helpers_engine`` — whose training folds hold every class
equally (6 images each) — or an imbalanced copy of it (6/4/6/3 training images).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from helpers_engine import (
    comparable,
    engine_data,
    invoke,
    metric_lines,
    quick_args,
    read_json,
    run_subprocess,
)
from torch.utils.data import DistributedSampler

from cdft_core.config import RunConfig, validate
from cdft_core.errors import UsageError
from cdft_core.training.balance import balanced_draw, balanced_weights, loss_weights
from cdft_core.training.ema import StageEma, with_average
from cdft_core.training.loaders import shard, steps_per_epoch, train_order
from cdft_core.training.state import Progress
from cdft_core.training.step import backward_step, image_loss, loss_shares, step_batches

_CACHE: dict[str, Path] = {}


# -- class weights ------------------------------------------------------------------------
def test_balanced_weights_are_inverse_frequencies():
    from sklearn.utils.class_weight import compute_class_weight

    labels = [0, 0, 0, 1, 2, 2]  # N = 6, K = 3: w_c = 6 / (3 n_c)
    assert balanced_weights(labels, 3).tolist() == pytest.approx([6 / 9, 6 / 3, 6 / 6])
    assert balanced_weights(labels, 3).tolist() == pytest.approx(
        compute_class_weight("balanced", classes=np.array([0, 1, 2]), y=np.array(labels)).tolist())
    # every class then weighs the same in total: sum over its images of w_c = N / K
    weights = balanced_weights(labels, 3)
    assert [float(weights[c]) * labels.count(c) for c in range(3)] == pytest.approx([2.0, 2.0, 2.0])


def test_a_class_without_training_images_gets_weight_zero_and_a_warning():
    lines: list[str] = []
    weights = loss_weights("balanced", [0, 0, 2], ["a", "b", "c"], lines.append)
    assert weights.tolist() == pytest.approx([3 / 4, 0.0, 3 / 2])  # K = 2 classes present
    assert lines[0].startswith("class weights (balanced, training loss only): a 0.75, b 0, c 1.5")
    assert "warning: the training split has no image of b" in lines[1]
    assert loss_weights("none", [0, 0, 2], ["a", "b", "c"], lines.append) is None and len(lines) == 2
    loss_weights("balanced", [0, 0, 2], ["a", "b", "c"], lines.append, sampler="balanced")
    assert "corrects the class imbalance twice" in lines[2]


# -- sampler ------------------------------------------------------------------------------
IMBALANCED = [0] * 60 + [1] * 20 + [2] * 10


def test_balanced_sampler_draws_classes_about_equally():
    counts = [0, 0, 0]
    for epoch in range(20):
        draw = balanced_draw(IMBALANCED, seed=1, epoch=epoch)
        assert len(draw) == len(IMBALANCED) and all(0 <= i < len(IMBALANCED) for i in draw)
        for index in draw:
            counts[IMBALANCED[index]] += 1
    # 1800 draws, each class with probability 1/3: 600 expected, sd ~20
    assert all(abs(count - 600) < 100 for count in counts), counts
    assert balanced_draw(IMBALANCED, seed=1, epoch=3) == balanced_draw(IMBALANCED, seed=1, epoch=3)
    assert balanced_draw(IMBALANCED, seed=1, epoch=3) != balanced_draw(IMBALANCED, seed=1, epoch=4)
    assert balanced_draw(IMBALANCED, seed=1, epoch=3) != balanced_draw(IMBALANCED, seed=2, epoch=3)


@pytest.mark.parametrize("world_size", [1, 2, 3, 4])
def test_balanced_shards_partition_one_draw(world_size):
    dataset = list(range(len(IMBALANCED)))
    draw = balanced_draw(IMBALANCED, seed=5, epoch=2)
    shares = [train_order(dataset, seed=5, epoch=2, rank=rank, world_size=world_size, sampler="balanced",
                          labels=IMBALANCED) for rank in range(world_size)]
    assert len({len(share) for share in shares}) == 1
    interleaved = [share[i] for i in range(len(shares[0])) for share in shares]
    assert interleaved[:len(draw)] == draw  # every rank took its share of the same draw
    assert interleaved[len(draw):] == draw[:len(interleaved) - len(draw)]  # DistributedSampler's padding
    capped = train_order(dataset, seed=5, epoch=2, rank=0, world_size=world_size, sampler="balanced",
                         labels=IMBALANCED, max_images=7)
    assert capped == shares[0][:7]


@pytest.mark.parametrize("size,world_size", [(24, 1), (24, 2), (9, 2), (7, 3), (2, 5)])
def test_random_sampler_is_the_distributed_shuffle_as_before(size, world_size):
    for epoch in range(3):
        for rank in range(world_size):
            before = DistributedSampler(range(size), num_replicas=world_size, rank=rank, shuffle=True, seed=1)
            before.set_epoch(epoch)
            assert train_order(range(size), seed=1, epoch=epoch, rank=rank, world_size=world_size) == list(before)
            # the balanced draw is shared out by the same rule
            perm = torch.randperm(size, generator=torch.Generator().manual_seed(1 + epoch)).tolist()
            assert shard(perm, rank, world_size) == list(before)


# -- accumulation -------------------------------------------------------------------------
def test_steps_count_optimizer_steps():
    assert steps_per_epoch(24, 1, 7, None) == 4
    assert steps_per_epoch(24, 1, 7, None, accumulate=2) == 2  # micro-batches 7,7 | 7,3
    assert steps_per_epoch(24, 2, 4, None, accumulate=2) == 2  # 12 per rank: 4,4 | 4
    assert steps_per_epoch(24, 1, 4, 2, accumulate=2) == 2
    assert [len(group) for group in step_batches(range(5), 2)] == [2, 2, 1]
    assert list(step_batches(range(4), 1)) == [[0], [1], [2], [3]]


def test_shares_are_images_over_the_step():
    labels = [torch.tensor([0, 1, 1]), torch.tensor([2])]
    assert loss_shares(labels) == [0.75, 0.25]
    assert loss_shares(labels[:1]) == [1.0]


def test_class_weighted_loss_is_the_plain_mean_so_batch_mix_and_ranks_do_not_cancel_it():
    """w_y·CE averaged over images: a one-class batch still feels its weight, and two ranks'
    halves average (as DDP does) to the whole batch's loss and gradient."""
    weights = torch.tensor([0.5, 2.0, 1.0])
    logits = torch.randn(8, 3, requires_grad=True)
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2])
    one_class = image_loss(logits[:4], labels[:4], weights)
    assert one_class.item() == pytest.approx(0.5 * F.cross_entropy(logits[:4], labels[:4]).item(), rel=1e-6)
    whole = image_loss(logits, labels, weights)
    (grad_whole,) = torch.autograd.grad(whole, logits)
    halves = [image_loss(logits[i::2], labels[i::2], weights) for i in (0, 1)]  # rank r takes every 2nd image
    (grad_ranks,) = torch.autograd.grad((halves[0] + halves[1]) / 2, logits)
    torch.testing.assert_close(grad_ranks, grad_whole)
    balanced = sum(F.cross_entropy(logits[labels == c], labels[labels == c]) for c in range(3)) / 3
    inverse = 8 / (3 * torch.bincount(labels).float())  # the balanced weights of this batch's counts
    assert image_loss(logits, labels, inverse).item() == pytest.approx(balanced.item(), rel=1e-5)


@pytest.mark.parametrize("weights", [None, torch.tensor([0.5, 2.0, 1.0])])
def test_accumulated_micro_batches_take_the_step_of_one_batch(weights):
    torch.manual_seed(0)
    inputs, labels = torch.randn(7, 5), torch.tensor([0, 1, 2, 1, 1, 0, 2])
    grads = []
    for splits in ([7], [4, 3], [2, 2, 3]):
        model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        torch.manual_seed(1)
        for p in model.parameters():
            torch.nn.init.normal_(p)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        batches = list(zip(torch.split(inputs, splits), torch.split(labels, splits), strict=True))
        result = backward_step(model, optimizer, batches, device=torch.device("cpu"), channels_last=False,
                               precision="fp32", scaler=None, class_weights=weights)
        expected = image_loss(model(inputs), labels, weights).item()  # the mean over all 7
        assert result.loss == pytest.approx(expected, rel=1e-6)
        assert result.count == 7
        grads.append([p.grad.clone() for p in model.parameters()])
    for other in grads[1:]:
        assert all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(grads[0], other, strict=True))


def test_a_trainable_parameter_no_gradient_reaches_is_named_after_the_first_step():
    from cdft_core.training.step import warn_ungraded

    model = torch.nn.Linear(3, 2)
    unused = torch.nn.Parameter(torch.zeros(4))
    optimizer = torch.optim.SGD([{"params": [model.weight, model.bias, unused],
                                  "param_names": ["head.weight", "head.bias", "prompt"]}], lr=0.1)
    model(torch.randn(2, 3)).sum().backward()
    lines: list[str] = []
    assert warn_ungraded(optimizer, lines.append, 0) == ["prompt"]
    assert lines == ["note: stage 1: 1 trainable parameter took no part in the first step's loss and stays as "
                     "it is: prompt"]
    unused.grad = torch.zeros(4)
    assert warn_ungraded(optimizer, lines.append, 0) == [] and len(lines) == 1


# -- early stopping -----------------------------------------------------------------------
def test_patience_counts_epochs_without_a_strictly_higher_accuracy():
    progress = Progress()
    done = []
    for epoch, accuracy in enumerate([0.5, 0.6, 0.6, 0.55, 0.7, 0.7, 0.7]):
        is_best = progress.note_validation({"accuracy": accuracy}, epoch)
        progress.epoch = epoch + 1
        done.append((is_best, progress.stage_done(10, 2)))
    # a tie is a new best (the >= rule moves the best epoch) but no improvement for --patience
    assert done == [(True, False), (True, False), (True, False), (False, True), (True, False), (True, False),
                    (True, True)]
    assert progress.best_epoch == 7 and progress.improved_epoch == 5
    assert not progress.stage_done(10, None) and progress.stage_done(7, None)


# -- moving average -----------------------------------------------------------------------
def test_ema_is_the_average_of_the_trainable_weights():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2))
    model[0].requires_grad_(False)  # frozen: not averaged
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    decay = 0.7
    ema = StageEma(model, decay)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(ema.state_dict()) == trainable
    expected = {n: p.detach().clone() for n, p in model.named_parameters() if n in trainable}  # the stage's start
    for _ in range(5):
        optimizer.zero_grad()
        model(torch.randn(8, 4)).sum().backward()
        optimizer.step()
        ema.update()
        for n, p in model.named_parameters():
            if n in trainable:
                expected[n] = decay * expected[n] + (1 - decay) * p.detach()
    for name, value in ema.state_dict().items():
        assert torch.allclose(value, expected[name], rtol=1e-6, atol=1e-7), name
    live = {k: v.clone() for k, v in model.state_dict().items()}
    with ema.applied():
        for n, p in model.named_parameters():
            assert torch.equal(p, ema.average[n] if n in trainable else live[n]), n
        assert torch.equal(model[1].running_mean, live["1.running_mean"])  # buffers: the live ones
    assert all(torch.equal(v, live[k]) for k, v in model.state_dict().items())  # restored exactly
    saved = with_average(model.state_dict(), ema.state_dict())
    assert torch.equal(saved["0.weight"], live["0.weight"]) and torch.equal(saved["2.weight"], ema.average["2.weight"])
    # continued from a saved average (a resume), the next update is the same
    resumed = StageEma(model, decay, {k: v.clone() for k, v in ema.state_dict().items()})
    ema.update()
    resumed.update()
    assert all(torch.equal(ema.average[n], resumed.average[n]) for n in trainable)


# -- configuration ------------------------------------------------------------------------
@pytest.mark.parametrize("changes,message", [
    ({"class_weights": "balance"}, "--class-weights 'balance' is not one of none, balanced; did you mean 'balanced'?"),
    ({"sampler": "weighted"}, "--sampler 'weighted' is not one of random, balanced"),
    ({"accumulate": 0}, "--accumulate must be at least 1, got 0"),
    ({"patience": 0}, "--patience must be at least 1, got 0"),
    ({"ema": 1.0}, "--ema is the average's decay, in (0, 1)"),
    ({"ema": 0.0}, "--ema is the average's decay, in (0, 1)"),
])
def test_options_are_validated_in_one_line(tmp_path, changes, message):
    config = RunConfig(dataset="breakhis", data_root=str(tmp_path), backbone="test_vit", **changes)
    with pytest.raises(UsageError) as error:
        validate(config)
    assert message in str(error.value) and "\n" not in str(error.value)


# -- end to end ---------------------------------------------------------------------------
def _imbalanced_split(factory) -> tuple[str, str]:
    """The engine tests' data with training images removed: 6 DC, 4 LC, 6 MC, 3 PC (19)."""
    root, split = engine_data(factory)
    if "imbalanced" not in _CACHE:
        table = pd.read_csv(split, dtype=str, keep_default_na=False)
        training = table["fold"].isin(["0", "2", "4"])
        drop = table.index[training & (table["label"] == "3") & (table["fold"] == "0")].tolist()
        drop += table.index[training & (table["label"] == "1") & (table["fold"] == "4")].tolist()[:2]
        path = factory.mktemp("imbalanced") / "splits.csv"
        table.drop(index=drop).to_csv(path, index=False)
        _CACHE["imbalanced"] = path
    return root, str(_CACHE["imbalanced"])


def _run(factory, name: str, *args: str, split: tuple[str, str] | None = None, strategy: str = "full",
         epochs: int = 1, env: dict | None = None, code: int = 0) -> tuple[Path, str]:
    root, split_file = split or engine_data(factory)
    run_dir = factory.mktemp(name) / "run"
    exit_code, _, err = invoke(*quick_args(root, split_file, strategy=strategy, epochs=epochs), "--output",
                               str(run_dir), *args, env=env)
    assert exit_code == code, err[-3000:]
    return run_dir, err


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _same_results(run_dir: Path, reference: Path) -> None:
    ours, theirs = read_json(run_dir / "summary.json"), read_json(reference / "summary.json")
    for key in ("val", "test", "best_epoch", "best_stage", "stages"):
        assert ours[key] == theirs[key], key
    assert metric_lines(run_dir) == metric_lines(reference)  # every epoch of every stage, exactly


def _checkpoint_matches_summary(run_dir: Path) -> None:
    summary = read_json(run_dir / "summary.json")
    code, out, err = invoke("eval", str(run_dir), "--json")
    assert code == 0, err
    metrics = json.loads(out)["metrics"]
    assert comparable(metrics) == comparable(summary["test"])
    assert metrics["loss"] == pytest.approx(summary["test"]["loss"], rel=1e-5)  # the unweighted loss


@pytest.mark.slow
def test_class_weights_change_only_the_training_loss(tmp_path_factory):
    # on the balanced split every weight is 1: the run is exactly the unweighted one
    plain, _ = _run(tmp_path_factory, "plain")
    ones, err = _run(tmp_path_factory, "ones", "--class-weights", "balanced")
    assert "class weights (balanced, training loss only): DC 1, LC 1, MC 1, PC 1" in err
    assert metric_lines(ones) == metric_lines(plain)
    assert torch.equal(_tensors(ones / "stage1-full" / "best.safetensors")["head.weight"],
                       _tensors(plain / "stage1-full" / "best.safetensors")["head.weight"])
    # imbalanced: the training loss is weighted, validation and test metrics are not
    imbalanced = _imbalanced_split(tmp_path_factory)
    unweighted, _ = _run(tmp_path_factory, "unweighted", split=imbalanced)
    weighted, err = _run(tmp_path_factory, "weighted", "--class-weights", "balanced", split=imbalanced)
    assert "DC 0.7917, LC 1.188, MC 0.7917, PC 1.583" in err  # 19 / (4 n_c)
    train = [[line for line in metric_lines(run) if line["split"] == "train"][0] for run in (weighted, unweighted)]
    assert train[0]["loss"] != train[1]["loss"]
    _checkpoint_matches_summary(weighted)


@pytest.mark.slow
def test_accumulate_2_equals_a_batch_twice_as_big_and_ema_is_the_average(tmp_path_factory, monkeypatch):
    """batch 6 x accumulate 2 == batch 12 on 19 training images (steps 12 | 7, the last one 6 + 1),
    with balanced class weights and an average; the average is the one computed by hand from
    the weights after each optimizer step, and it is what best.safetensors holds."""
    import cdft_core.training.engine as engine

    steps: list[dict[str, torch.Tensor]] = []

    class Recording(StageEma):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            steps.append({n: p.detach().clone() for n, p in self.params.items()})

        def update(self):
            steps.append({n: p.detach().clone() for n, p in self.params.items()})
            super().update()

    split = _imbalanced_split(tmp_path_factory)
    common = ("--class-weights", "balanced", "--ema", "0.6", "--warmup-epochs", "0")
    monkeypatch.setattr(engine, "StageEma", Recording)
    big, err = _run(tmp_path_factory, "batch12", *common, "--batch-size", "12", split=split)
    monkeypatch.undo()
    assert "1 epochs x 2 steps" in err and "effective batch 12 (12 x 1 accumulated x 1 process)" in err
    accumulated, err = _run(tmp_path_factory, "batch6x2", *common, "--batch-size", "6", "--accumulate", "2", split=split)
    assert "1 epochs x 2 steps" in err and "effective batch 12 (6 x 2 accumulated x 1 process)" in err

    a, b = (_tensors(run / "stage1-full" / "best.safetensors") for run in (big, accumulated))
    assert a.keys() == b.keys()
    for key in a:
        # Adam divides each gradient by its own running size, so a gradient that is rounding noise
        # gets a full, arbitrary step: the attention's key bias, which softmax ignores (its gradient
        # is 0 in exact arithmetic, and it changes no output). Every other weight agrees to 1e-5,
        # a 300th of one step at lr 3e-3.
        x, y = a[key], b[key]
        if key.endswith("attn.qkv.bias"):
            third = x.numel() // 3
            x, y = torch.cat([x[:third], x[2 * third:]]), torch.cat([y[:third], y[2 * third:]])
        assert torch.allclose(x, y, rtol=0, atol=1e-5), key
    val = [[line for line in metric_lines(run) if line["split"] == "val"][0] for run in (big, accumulated)]
    assert comparable(val[0]) == comparable(val[1])
    assert [line["global_step"] for line in metric_lines(accumulated)] == [2, 2, 2]  # optimizer steps
    summary = read_json(accumulated / "summary.json")
    assert summary["effective_batch"] == 12 and summary["stages"][0]["stopped_early"] is False

    # the average by hand: from the stage's start, one step per optimizer step
    assert len(steps) == 3
    expected = dict(steps[0])
    for weights in steps[1:]:
        expected = {n: 0.6 * expected[n] + 0.4 * weights[n] for n in expected}
    for name, value in expected.items():
        assert torch.allclose(a[name], value, rtol=1e-6, atol=1e-7), name
    live_after = steps[-1]  # the last update happened after the last step: the live weights then
    assert not torch.allclose(a["head.weight"], live_after["head.weight"])
    _checkpoint_matches_summary(big)


@pytest.mark.slow
def test_early_stopping_stops_the_stage_and_resumes_finished(tmp_path_factory):
    """At a learning rate too small to change a prediction, validation accuracy stays where it
    is: with --patience 1 each stage stops after its second epoch and the next stage runs. A run
    stopped by SIGTERM at the end of that epoch finishes the stage on resume."""
    args = ("--patience", "1", "--lr", "1e-12", "--strategy-option", "stage_epochs=4,3")
    reference, err = _run(tmp_path_factory, "patience", *args, strategy="staged")
    summary = read_json(reference / "summary.json")
    assert [(s["name"], s["epochs"], s["epochs_run"], s["stopped_early"]) for s in summary["stages"]] == [
        ("frt", 4, 2, True), ("full", 3, 2, True)]
    assert "stage 1: no higher validation accuracy for 1 epoch (--patience): stopping early after epoch 2 of 4" in err
    assert [line["epoch"] for line in metric_lines(reference) if line["split"] == "val"] == [1, 2, 1, 2]

    # SIGTERM during the last step of the stopping epoch: the state is saved at its end
    interrupted, _ = _run(tmp_path_factory, "patience-sigterm", *args, strategy="staged", code=143,
                          env={"CDFT_TEST_FAULT": "stage=1,epoch=2,step=3,action=sigterm"})
    assert [p.name for p in (interrupted / "resume").glob("*.json")] == ["s00-e00002-b0000000.json"]
    code, _, err = invoke("run", "--resume", str(interrupted))
    assert code == 0, err[-3000:]
    assert "stage 1 frt: test accuracy" in err and "stage 1 epoch 3" not in err
    _same_results(interrupted, reference)


@pytest.mark.slow
def test_all_options_resume_exactly_after_sigterm_mid_epoch(tmp_path_factory):
    """accumulate, the average, both balancing options (stage 1 on stored training views, capped at
    3 optimizer steps of 6 images an epoch): SIGTERM two optimizer steps into stage 2, resumed,
    ends exactly as the uninterrupted run (the average and the draw included)."""
    split = _imbalanced_split(tmp_path_factory)
    args = ("--batch-size", "3", "--accumulate", "2", "--ema", "0.8", "--class-weights", "balanced",
            "--sampler", "balanced", "--train-views", "2", "--max-steps-per-epoch", "3")
    reference, err = _run(tmp_path_factory, "options", *args, split=split, strategy="staged", epochs=2)
    assert "2 epochs x 3 steps" in err and "stage 1 epoch 1 step 3/3" in err
    interrupted, _ = _run(tmp_path_factory, "options-sigterm", *args, split=split, strategy="staged", epochs=2,
                          code=143, env={"CDFT_TEST_FAULT": "stage=2,epoch=1,step=2,action=sigterm"})
    assert [p.name for p in (interrupted / "resume").glob("*.json")] == ["s01-e00000-b0000002.json"]
    saved = _tensors(next((interrupted / "resume").glob("*.state.safetensors")))
    assert any(name.startswith("ema.") for name in saved)
    code, _, err = invoke("run", "--resume", str(interrupted))
    assert code == 0, err[-3000:]
    assert "2 steps of epoch 1" in err
    _same_results(interrupted, reference)
    _checkpoint_matches_summary(reference)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_with_every_option_match_their_checkpoint(tmp_path_factory, tmp_path):
    root, split = _imbalanced_split(tmp_path_factory)
    run_dir = tmp_path / "run"
    done = run_subprocess(*quick_args(root, split, strategy="full", epochs=2), "--output", str(run_dir),
                          "--nproc-per-node", "2", "--batch-size", "4", "--accumulate", "2", "--ema", "0.8",
                          "--sampler", "balanced", "--class-weights", "balanced")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "effective batch 16 (4 x 2 accumulated x 2 processes)" in done.stderr
    summary = read_json(run_dir / "summary.json")
    assert summary["world_size"] == 2 and summary["effective_batch"] == 16
    assert [line["global_step"] for line in metric_lines(run_dir) if line["split"] == "val"] == [2, 4]
    assert math.isfinite(summary["test"]["loss"])
    _checkpoint_matches_summary(run_dir)


def test_a_stage_announces_its_peak_rates_even_resumed_mid_warm_up():
    """A resumed optimizer holds the warm-up's current rate; the stage line names the scheduled peak."""
    from cdft_core.training.schedule import format_rates, rates, set_rates

    head, body = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    optimizer = torch.optim.Adam([{"params": head.parameters(), "lr": 1e-3, "label": "head"},
                                  {"params": body.parameters(), "lr": 1e-4, "label": "trainable"}])
    for group in optimizer.param_groups:
        group["base_lr"] = group["lr"]
    set_rates(optimizer, 0.34)
    resumed = torch.optim.Adam([{"params": head.parameters(), "lr": 1.0}, {"params": body.parameters(), "lr": 1.0}])
    resumed.load_state_dict(optimizer.state_dict())
    assert rates(resumed) == pytest.approx({"head": 3.4e-4, "trainable": 3.4e-5})
    assert format_rates(rates(resumed, peak=True)) == "lr head 0.001, trainable 0.0001"
