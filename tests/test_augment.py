"""``--augment paper|paper+hed|none``: ``none`` is the evaluation pipeline, ``paper`` is the
augmentation as it always was, ``paper+hed`` adds HED stain jitter that moves colours by
the drawn amounts and nothing else, reproducibly (image cache, loader workers, resume);
bad choices and a missing scikit-image are one-line usage errors before any work."""

from __future__ import annotations

import pickle
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from helpers_data import DATA_CONFIG
from helpers_engine import engine_data, invoke, metric_lines, quick_args, read_json
from torchvision.transforms import v2

from cdft_core.config import RunConfig, validate
from cdft_core.data.images import ImageDataset
from cdft_core.data.stain import OD_SCALE, SIGMA, HedJitter
from cdft_core.data.transforms import eval_transform, split_resize, train_transform
from cdft_core.errors import UsageError

#: an H-rich purple and an E-rich pink: every stain amount positive (scikit-image's rgb2hed)
PURPLE, PINK = (120, 65, 160), (200, 120, 180)


def _image(seed: int = 0, height: int = 48, width: int = 40) -> torch.Tensor:
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _two_regions() -> tuple[torch.Tensor, torch.Tensor]:
    """A 16×16 image: purple left of column 6, pink from it on; and the purple mask."""
    image = torch.empty(3, 16, 16, dtype=torch.uint8)
    image[:, :, :6] = torch.tensor(PURPLE, dtype=torch.uint8)[:, None, None]
    image[:, :, 6:] = torch.tensor(PINK, dtype=torch.uint8)[:, None, None]
    mask = torch.zeros(16, 16, dtype=torch.bool)
    mask[:, :6] = True
    return image, mask


def _paper_before_augment_existed(data_config):
    """train_transform as written before ``--augment``: ``paper`` must stay bit for bit this."""
    from cdft_core.data.transforms import _normalise, resize_transform

    return v2.Compose([
        resize_transform(data_config),
        v2.RandomHorizontalFlip(p=0.5),
        v2.RandomVerticalFlip(p=0.5),
        v2.RandomApply([v2.ColorJitter(brightness=0.1, contrast=0.1)], p=0.5),
        v2.RandomApply([v2.RandomAffine(degrees=180, translate=(0.05, 0.05), scale=(0.7, 1.3),
                                        interpolation=v2.InterpolationMode.BILINEAR, fill=0)], p=0.7),
        *_normalise(data_config),
    ])


def _draws(transform, image: torch.Tensor, seeds) -> list[torch.Tensor]:
    out = []
    for seed in seeds:
        torch.manual_seed(seed)
        out.append(transform(image))
        out.append(torch.rand(4))  # what is left of the stream: the same draws were consumed
    return out


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


# -- the three pipelines ----------------------------------------------------------------------
def test_none_is_the_evaluation_pipeline_and_draws_nothing():
    image = _image()
    none = train_transform(DATA_CONFIG, "none")
    torch.manual_seed(3)
    out, after = none(image), torch.rand(4)
    torch.manual_seed(3)
    assert torch.equal(after, torch.rand(4))  # no random number used
    assert torch.equal(out, eval_transform(DATA_CONFIG)(image))
    assert repr(none) == repr(eval_transform(DATA_CONFIG))


def test_paper_is_unchanged_bit_for_bit():
    image, seeds = _image(1), range(12)
    reference = _draws(_paper_before_augment_existed(DATA_CONFIG), image, seeds)
    assert _same(_draws(train_transform(DATA_CONFIG), image, seeds), reference)  # the default
    assert _same(_draws(train_transform(DATA_CONFIG, "paper"), image, seeds), reference)
    assert not _same(_draws(train_transform(DATA_CONFIG, "paper+hed"), image, seeds), reference)


def test_paper_hed_is_the_paper_pipeline_with_stain_jitter_right_after_the_resize():
    hed, paper = train_transform(DATA_CONFIG, "paper+hed").transforms, train_transform(DATA_CONFIG).transforms
    assert isinstance(hed[1], HedJitter) and hed[1].sigma == SIGMA == 0.05
    assert [repr(step) for step in hed[:1] + hed[2:]] == [repr(step) for step in paper]
    # the same numbers as resize, then the jitter, then the paper's remaining steps, from one stream
    image = _image(2)
    rest = v2.Compose(paper[1:])
    for seed in range(6):
        torch.manual_seed(seed)
        whole = train_transform(DATA_CONFIG, "paper+hed")(image)
        torch.manual_seed(seed)
        stepwise = rest(HedJitter()(paper[0](image)))
        assert torch.equal(whole, stepwise)
    # the image cache's split still finds the resize first
    spec, after = split_resize(train_transform(DATA_CONFIG, "paper+hed"))
    assert (spec.height, spec.width) == (32, 32) and isinstance(after.transforms[0], HedJitter)


# -- the stain jitter itself ------------------------------------------------------------------
def test_hed_jitter_moves_colours_by_the_drawn_stain_amounts_and_keeps_geometry():
    from skimage.color import rgb2hed

    image, purple = _two_regions()
    jitter = HedJitter()
    stains = {name: rgb2hed(np.array([[colour]], dtype=np.uint8))[0, 0] for name, colour in
              (("purple", PURPLE), ("pink", PINK))}
    checked, outputs = 0, []
    for seed in range(30):
        torch.manual_seed(seed)
        alpha, beta = jitter.draw()
        assert ((alpha - 1).abs() <= SIGMA).all() and (beta.abs() <= SIGMA * OD_SCALE).all()
        torch.manual_seed(seed)
        out = jitter(image)
        outputs.append(out)
        assert out.dtype == torch.uint8 and out.shape == image.shape
        for name, mask in (("purple", purple), ("pink", ~purple)):
            colours = out[:, mask].T.unique(dim=0)
            assert len(colours) == 1  # a constant region stays constant: nothing moved, nothing blurred
            colour = colours[0]
            if (colour == 0).any() or (colour == 255).any():
                continue  # clipped to the uint8 range: no longer the drawn amounts
            measured = rgb2hed(colour.numpy().astype(np.uint8)[None, None])[0, 0]
            expected = np.maximum(alpha.numpy() * stains[name] + beta.numpy(), 0)  # rgb2hed clips at 0
            assert np.allclose(measured, expected, atol=5e-3), (seed, name, measured, expected)
            checked += 1
    assert checked >= 20
    assert any(not torch.equal(out, image) for out in outputs)  # it does change colours
    assert len({tuple(out[:, 0, 0].tolist()) for out in outputs}) > 20  # different seeds, different stains
    torch.manual_seed(7)
    first = jitter(image)
    torch.manual_seed(7)
    assert torch.equal(jitter(image), first)  # a seed fixes it
    textured = _image(5, 16, 16)
    for seed in range(3):  # pixel-wise: moving the pixels first moves the result the same way
        torch.manual_seed(seed)
        moved_after = jitter(textured).flip(-1).transpose(1, 2)
        torch.manual_seed(seed)
        assert torch.equal(jitter(textured.flip(-1).transpose(1, 2).contiguous()), moved_after)
    with pytest.raises(ValueError, match="uint8 3xHxW"):
        jitter(image.float())


def test_hed_jitter_with_no_jitter_is_the_deconvolution_round_trip():
    from cdft_core.data.stain import jitter_hed

    image, _ = _two_regions()
    assert torch.equal(jitter_hed(image, [1, 1, 1], [0, 0, 0]), image)  # H&E colours come back as they were
    darker = jitter_hed(image, [1.05, 1, 1], [0.05, 0, 0])  # more haematoxylin: less light through
    assert (darker.int() <= image.int()).all() and (darker.int() < image.int()).any()
    from torchvision import tv_tensors

    wrapped = jitter_hed(tv_tensors.Image(image), [1.05, 1, 1], [0.05, 0, 0])  # v2 pipelines may pass Images
    assert isinstance(wrapped, tv_tensors.Image) and torch.equal(wrapped.as_subclass(torch.Tensor), darker)


# -- reproducible where training needs it ---------------------------------------------------
def test_paper_hed_from_the_image_cache_and_in_loader_workers(local_root, table):
    from cdft_core.data.image_cache import cache_for_tables
    from cdft_core.training.loaders import SeededAugmentation, make_loader

    rows = table.iloc[:8]
    transform = train_transform(DATA_CONFIG, "paper+hed")
    cache = cache_for_tables(local_root, [rows], DATA_CONFIG)
    plain = SeededAugmentation(ImageDataset(local_root, rows, transform), seed=4)
    cached = SeededAugmentation(ImageDataset(local_root, rows, transform, cache), seed=4)
    keys = [(epoch, i) for epoch in (0, 1) for i in range(len(rows))]
    decoded = [plain[key][0] for key in keys]
    assert _same([cached[key][0] for key in keys], decoded)
    assert not torch.equal(decoded[0], decoded[len(rows)])  # another epoch, another augmentation
    assert _same([pickle.loads(pickle.dumps(cached))[key][0] for key in keys], decoded)  # as a worker gets it
    for workers in (0, 2):
        batches = [images for images, _ in make_loader(cached, keys, 4, workers, 0, device="cpu")]
        assert torch.equal(torch.cat(batches), torch.stack(decoded)), workers


def test_train_views_of_each_augmentation_have_their_own_feature_cache_key(monkeypatch):
    from cdft_core.training import frozen

    seen = []
    monkeypatch.setattr(frozen, "open_store", lambda inputs, *args, **kwargs: seen.append(inputs))
    source = SimpleNamespace(key={"backbone": "test_vit"}, dist=SimpleNamespace(device=torch.device("cpu")),
                             root="/data", cache_dir=None, log=None, batches=None)
    dataset = type("Views", (), {"__len__": lambda self: 2, "dataset": SimpleNamespace(labels=[0, 1])})()
    for augment in ("paper", "paper+hed", "none"):
        frozen.view_features(source, dataset, ["a.png", "b.png"], views=2, seed=1, batch_size=2, num_workers=0,
                             augment=augment)
    assert [inputs["transform"] for inputs in seen] == ["augment", "augment:paper+hed", "augment:none"]


@pytest.mark.slow
def test_probe_stores_the_views_of_the_augmentation_it_was_given(tmp_path_factory, tmp_path):
    root, split = engine_data(tmp_path_factory)
    args = ["probe", "--dataset", "breakhis", "--data-root", root, "--split-file", split, "--val-fold", "1",
            "--test-fold", "3", "--backbone", "test_vit", "--no-pretrained", "--image-size", "32", "--epochs", "1",
            "--lrs", "1e-2", "--weight-decays", "0", "--train-views", "2", "--num-workers", "0", "--device", "cpu"]
    for augment in ("paper+hed", "paper"):
        code, _, err = invoke(*args, "--augment", augment, "--output", str(tmp_path / augment))
        assert code == 0, err
        assert yaml.safe_load((tmp_path / augment / "config.yaml").read_text())["augment"] == augment
        views = [line for line in err.splitlines() if "augmented views" in line and "computing" not in line]
        assert len(views) == 1 and "feature cache built" in views[0], err  # not the other augmentation's views


# -- configuration and errors ---------------------------------------------------------------------
def _config(tmp_path, **changes) -> RunConfig:
    return RunConfig(dataset="breakhis", data_root=str(tmp_path), backbone="test_vit", **changes)


def test_augment_is_a_config_key_with_a_checked_choice(tmp_path):
    from cdft_core.config import merge

    assert RunConfig().augment == "paper"
    validate(_config(tmp_path, augment="paper+hed"))
    assert merge(RunConfig(), {"augment": "none"}, source="preset.yaml").augment == "none"
    for wrong, meant in (("paper-hed", "paper+hed"), ("hed", "paper+hed"), ("Paper", "paper"), ("off", "none")):
        with pytest.raises(UsageError) as error:
            validate(_config(tmp_path, augment=wrong))
        assert str(error.value) == f"--augment {wrong!r} is not one of paper, paper+hed, none; did you mean {meant!r}?"
    with pytest.raises(UsageError, match=r"^--augment 'randaugment' is not one of paper, paper\+hed, none$"):
        validate(_config(tmp_path, augment="randaugment"))
    with pytest.raises(UsageError, match="not one of"):
        train_transform(DATA_CONFIG, "hed")


def test_the_hparams_name_the_augmentation():
    from cdft_core.strategy import Stage, Strategy
    from cdft_core.training.records import run_hparams

    run = SimpleNamespace(
        config=RunConfig(dataset="breakhis", data_root="/d", backbone="test_vit", augment="paper+hed"),
        strategy=Strategy("full", (Stage("full", lambda _: {}, {}),), default_adapter="none"), precision="fp32",
        model=SimpleNamespace(spec={"backbone": "test_vit", "adapter": "none", "image_size": 32}),
        splits=SimpleNamespace(protocol="patient", classes=["a", "b"]),
        dist=SimpleNamespace(world_size=1, device=torch.device("cpu")),
    )
    assert run_hparams(run)["augment"] == "paper+hed"


def test_a_missing_scikit_image_names_the_extra_before_any_model_is_built(tmp_path_factory, tmp_path, monkeypatch):
    import cdft_core.models.model as model_module

    root, split = engine_data(tmp_path_factory)
    for name in [m for m in sys.modules if m == "skimage" or m.startswith("skimage.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "skimage", None)  # import skimage raises ImportError
    monkeypatch.setattr(model_module, "build_model", lambda *a, **k: pytest.fail("a model was built"))
    code, _, err = invoke(*quick_args(root, split, strategy="full", epochs=1, extra=("--augment", "paper+hed")),
                          "--output", str(tmp_path / "run"))
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == ["cdft: error: --augment paper+hed needs scikit-image for its colour deconvolution; install it "
                     "with pip install 'cdft[stain]', or use --augment paper"], err
    assert not (tmp_path / "run").exists()
    with pytest.raises(UsageError, match=r"pip install 'cdft\[stain\]'"):
        HedJitter()
    train_transform(DATA_CONFIG, "paper")  # the other choices need no scikit-image
    train_transform(DATA_CONFIG, "none")


# -- a whole run ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_a_paper_hed_run_records_it_and_resumes_exactly(tmp_path_factory, tmp_path, monkeypatch):
    """An uninterrupted ``--augment paper+hed`` run against one stopped by SIGTERM in the
    middle of its second epoch and resumed: the same metrics, bit for bit; the resumed run
    jitters stains (its saved configuration), and ``--augment`` may not change on resume."""
    root, split = engine_data(tmp_path_factory)
    args = quick_args(root, split, strategy="full", epochs=2,
                      extra=("--augment", "paper+hed", "--max-steps-per-epoch", "3", "--no-tensorboard"))
    reference, run_dir = tmp_path / "reference", tmp_path / "run"
    code, out, err = invoke(*args, "--output", str(reference))
    assert code == 0, err
    assert yaml.safe_load((reference / "config.yaml").read_text())["augment"] == "paper+hed"
    assert "run directory:" in out and "tensorboard --logdir" not in out  # --no-tensorboard: no event files to open
    assert not (reference / "tensorboard").exists()

    sigterm = {"CDFT_TEST_FAULT": "stage=1,epoch=2,step=1,action=sigterm"}  # in the middle of epoch 2
    code, _, err = invoke(*args, "--output", str(run_dir), env=sigterm)
    assert code == 143, err
    assert not (run_dir / "summary.json").exists()
    code, _, err = invoke("run", "--resume", str(run_dir), "--augment", "none")
    assert code == 2 and "drop --augment" in err

    calls = []
    jitter_call = HedJitter.__call__
    monkeypatch.setattr(HedJitter, "__call__", lambda self, image: calls.append(1) or jitter_call(self, image))
    code, _, err = invoke("run", "--resume", str(run_dir))
    assert code == 0, err
    assert "resuming" in err and "1 steps of epoch 2" in err, err  # in the middle of an epoch
    assert calls  # the saved configuration's augmentation
    assert metric_lines(run_dir) == metric_lines(reference)
    ours, theirs = read_json(run_dir / "summary.json"), read_json(reference / "summary.json")
    assert (ours["val"], ours["test"], ours["best_epoch"]) == (theirs["val"], theirs["test"], theirs["best_epoch"])
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["augment"] == "paper+hed"


@pytest.mark.slow
def test_train_views_without_augmentation_store_one_view(tmp_path_factory, tmp_path):
    """--augment none: every view would be the same resized image, so one is stored (the images
    an uncached epoch uses), however many --train-views asks for."""
    root, split = engine_data(tmp_path_factory)
    args = quick_args(root, split, strategy="linear", epochs=2, extra=("--augment", "none", "--train-views", "3",
                                                                        "--no-tensorboard"))
    code, _, err = invoke(*args, "--cache-dir", str(tmp_path / "cache"), "--output", str(tmp_path / "run"))
    assert code == 0, err
    assert "x 1 augmented views" in err and "x 3 augmented views" not in err
    assert "one view, the images an uncached epoch would use" in err
