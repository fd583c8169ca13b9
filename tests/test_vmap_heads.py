"""Vectorised heads: training n heads with vmap equals training each one alone with torch.optim."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers_strategy import tiny_model

from cdft_core.functional import vmap_heads

DIM, CLASSES, STEPS_PER_EPOCH, EPOCHS, BATCH = 16, 3, 3, 2, 8


def _data(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(BATCH * STEPS_PER_EPOCH, DIM, generator=generator)
    labels = torch.randint(0, CLASSES, (features.shape[0],), generator=generator)
    return features, labels


def _train_alone(template, init, lr, features, labels, make_optimizer, shuffle_seed):
    head = torch.nn.Linear(DIM, CLASSES)
    head.load_state_dict(init)
    optimizer = make_optimizer(head.parameters(), lr)
    generator = torch.Generator().manual_seed(shuffle_seed)
    losses = []
    for _ in range(EPOCHS):
        order = torch.randperm(features.shape[0], generator=generator)
        for start in range(0, features.shape[0], BATCH):
            index = order[start : start + BATCH]
            optimizer.zero_grad()
            loss = F.cross_entropy(head(features[index]), labels[index])
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
    return head.state_dict(), torch.stack(losses)


@pytest.mark.parametrize(
    ("functional_optimizer", "make_optimizer"),
    [
        (vmap_heads.sgd(momentum=0.9, weight_decay=1e-3), lambda p, lr: torch.optim.SGD(p, lr=lr, momentum=0.9, weight_decay=1e-3)),
        (vmap_heads.adam(weight_decay=1e-3), lambda p, lr: torch.optim.Adam(p, lr=lr, weight_decay=1e-3)),
    ],
    ids=["sgd", "adam"],
)
def test_vmapped_lr_sweep_equals_training_each_head_alone(functional_optimizer, make_optimizer):
    features, labels = _data()
    template = torch.nn.Linear(DIM, CLASSES)
    lrs = torch.tensor([1e-3, 1e-2, 1e-1])
    initial = vmap_heads.init_heads(template, len(lrs), seed=0)
    trained, _state, losses = vmap_heads.train_heads(
        template, initial, lrs, features, labels,
        optimizer=functional_optimizer, epochs=EPOCHS, batch_size=BATCH, shuffle_seed=7,
    )
    assert losses.shape == (EPOCHS * STEPS_PER_EPOCH, len(lrs))
    starts = vmap_heads.unstack(initial)
    for i, head_params in enumerate(vmap_heads.unstack(trained)):
        alone, alone_losses = _train_alone(template, starts[i], float(lrs[i]), features, labels, make_optimizer, 7)
        for name, value in alone.items():
            assert torch.allclose(head_params[name], value, atol=1e-5), (i, name)
            assert not torch.equal(value, starts[i][name])  # it did train
        assert torch.allclose(losses[:, i], alone_losses, atol=1e-5)
    # different learning rates give different heads
    assert not torch.allclose(trained["weight"][0], trained["weight"][2])


def test_init_heads_same_or_independent_and_template_untouched():
    template = torch.nn.Linear(DIM, CLASSES)
    before = template.weight.clone()
    same = vmap_heads.init_heads(template, 3, seed=1)
    assert same["weight"].shape == (3, CLASSES, DIM)
    assert torch.equal(same["weight"][0], same["weight"][2])
    independent = vmap_heads.init_heads(template, 3, seed=1, same_init=False)
    assert not torch.equal(independent["weight"][0], independent["weight"][1])
    kept = vmap_heads.init_heads(template, 2, seed=None)
    assert torch.equal(kept["weight"][1], before)
    assert torch.equal(template.weight, before)


def test_linear_probe_sweep_on_frozen_backbone_features():
    """The intended use: features from a frozen backbone, heads per learning rate, pick the best."""
    model = tiny_model("test_vit").eval()
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(12, 3, 32, 32, generator=generator)
    labels = torch.arange(12) % 3
    with torch.no_grad():
        features = model.backbone(images) if not hasattr(model.backbone, "pooled") else model.backbone.pooled(images)
    features = features.reshape(features.shape[0], -1)
    template = torch.nn.Linear(features.shape[1], 3)
    lrs = torch.tensor([1e-4, 1e-1])
    params, _, losses = vmap_heads.train_heads(
        template, vmap_heads.init_heads(template, 2), lrs, features, labels, optimizer=vmap_heads.adam(), epochs=20
    )
    accuracy = vmap_heads.heads_accuracy(template, params, features, labels)
    assert accuracy.shape == (2,)
    assert accuracy[1] > accuracy[0]  # the larger lr fits 12 points in 20 steps, the tiny one barely moves
    assert losses[-1, 1] < losses[0, 1]
    best = vmap_heads.unstack(params)[int(accuracy.argmax())]
    template.load_state_dict(best)  # a plain state dict for the template


def test_train_heads_checks_the_number_of_learning_rates():
    template = torch.nn.Linear(DIM, CLASSES)
    features, labels = _data()
    with pytest.raises(ValueError, match="3 learning rates"):
        vmap_heads.train_heads(template, vmap_heads.init_heads(template, 2), torch.ones(3), features, labels, optimizer=vmap_heads.sgd())
