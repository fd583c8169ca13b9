"""Damaged or hostile run files give one error line, never a raw Python exception, a read
of a file outside the run or an unbounded read: ``summary.json``, a checkpoint's metadata
and model spec, a resume state, and paths to devices and pipes.

One real tiny run (complete) and one interrupted run (with a resume state) are trained
once; every test damages a copy.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
from helpers_engine import engine_data, invoke, quick_args


def _one_error_line(err: str) -> str:
    """The error line; it must be the only line on stderr that says something went wrong."""
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert "Traceback" not in err, err
    errors = [line for line in lines if line.startswith("cdft: error:")]
    assert len(errors) == 1 and errors[0] == lines[-1], err
    return errors[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """A complete one-stage run (summary.json, stage1-frt/best.safetensors)."""
    root, split = engine_data(tmp_path_factory)
    out = tmp_path_factory.mktemp("damaged") / "run"
    code, _, err = invoke(*quick_args(root, split, strategy="frt", epochs=1), "--output", str(out))
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory) -> Path:
    """A run that failed in its second epoch: it holds the resume state of the first."""
    root, split = engine_data(tmp_path_factory)
    out = tmp_path_factory.mktemp("damaged") / "interrupted"
    code, _, err = invoke(*quick_args(root, split, strategy="frt", epochs=2), "--output", str(out),
                          env={"CDFT_TEST_FAULT": "stage=1,epoch=2,step=1,action=raise"})
    assert code == 1 and "injected test fault" in err, err
    assert list((out / "resume").glob("*.json")) and not (out / "summary.json").exists()
    return out


@pytest.fixture(scope="module")
def picture(tmp_path_factory) -> Path:
    """One image for ``cdft predict`` (it checks its inputs before it opens the model)."""
    from PIL import Image

    path = tmp_path_factory.mktemp("picture") / "a.png"
    Image.new("RGB", (40, 40), (200, 120, 90)).save(path)
    return path


def _copy(source: Path, tmp_path: Path) -> Path:
    copy = tmp_path / source.name
    shutil.copytree(source, copy)
    return copy


# -- summary.json --------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("summary", [
    "{not json", "[1, 2]", '{"checkpoint": null}', '{"checkpoint": "/etc/passwd"}', '{"checkpoint": "/dev/zero"}',
    '{"checkpoint": "../../../../../../etc/passwd"}', '{"checkpoint": "stage1-frt/../../x/best.safetensors"}',
    b"\xff\xfe\x00garbage",
])
def test_a_damaged_summary_names_itself_and_the_checkpoint_to_pass(run, tmp_path, summary, picture):
    copy = _copy(run, tmp_path)
    target = copy / "summary.json"
    target.write_bytes(summary if isinstance(summary, bytes) else summary.encode())
    for args in (("eval", str(copy), "--device", "cpu", "--num-workers", "0"),
                 ("predict", str(copy), str(picture), "-o", str(tmp_path / "p.csv"), "--device", "cpu"),
                 ("export", str(copy), "-o", str(tmp_path / "m.onnx"))):
        code, _, err = invoke(*args)
        line = _one_error_line(err)
        assert code == 2, err
        assert f"{str(target)!r} is damaged" in line, line
        assert f"pass the checkpoint file itself (e.g. {copy / 'stage1-frt' / 'best.safetensors'})" in line, line


@pytest.mark.slow
def test_a_summary_that_is_a_device_is_not_read(run, tmp_path):
    copy = _copy(run, tmp_path)
    (copy / "summary.json").unlink()
    (copy / "summary.json").symlink_to("/dev/zero")
    code, _, err = invoke("eval", str(copy), "--device", "cpu")
    assert code == 2 and "summary.json' is damaged" in _one_error_line(err), err


# -- model files: devices, pipes, sizes ------------------------------------------------
def test_a_device_is_refused_as_a_checkpoint():
    code, _, err = invoke("eval", "/dev/zero", "--device", "cpu")
    line = _one_error_line(err)
    assert code == 2 and "'/dev/zero' is not a regular file" in line and "pass a .safetensors" in line, err


def test_a_pipe_is_refused_without_opening_it(tmp_path, picture):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    writer = os.open(fifo, os.O_RDWR)  # without the check a reader would block until this closes
    os.write(writer, b"x" * 64)
    closed: list[bool] = []

    def close() -> None:
        if not closed:
            closed.append(True)
            os.close(writer)

    timer = threading.Timer(10, close)  # so that a reader of the pipe fails the test instead of hanging
    timer.start()
    try:
        code, _, err = invoke("predict", str(fifo), str(picture), "-o", str(tmp_path / "p.csv"), "--device", "cpu")
    finally:
        timer.cancel()
        close()
    line = _one_error_line(err)
    assert code == 2 and "is not a regular file" in line, err


def test_no_more_than_the_stated_size_is_read():
    from cdft_core.errors import CdftError
    from cdft_core.training.checkpoint import READ_MARGIN, read_bounded

    class Endless:
        """A filesystem whose file says 10 bytes and holds far more (it grew, or it lies)."""

        def info(self, path):
            return {"type": "file", "size": 10}

        def open(self, path, mode):
            return io.BytesIO(b"\0" * (100 * READ_MARGIN))

    with pytest.raises(CdftError, match=r"grew while it was read \(beyond its 10 bytes\)"):
        read_bounded(Endless(), "x", "x")


# -- checkpoint metadata and model spec ------------------------------------------------
def _rewrite(source: Path, target: Path, **changes: object) -> Path:
    """A copy of model file ``source`` with metadata entries replaced (a str is stored raw,
    anything else JSON-encoded; None drops the entry)."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(source), "pt") as handle:
        meta = dict(handle.metadata())
    tensors = load_file(str(source))
    for key, value in changes.items():
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value if isinstance(value, str) else json.dumps(value)
    save_file(tensors, str(target), metadata=meta)
    return target


def _spec(run: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(run / "stage1-frt" / "best.safetensors"), "pt") as handle:
        return json.loads(handle.metadata()["cdft_spec"])


@pytest.mark.slow
@pytest.mark.parametrize(("key", "raw", "problem"), [
    ("cdft_config", "{not json", "cdft_config is not a JSON object"),
    ("cdft_config", "[1, 2]", "cdft_config is not a JSON object"),
    ("cdft_spec", "garbage", "cdft_spec is not a JSON object"),
    ("cdft_classes", "abc", "cdft_classes is not a list of strings"),
    ("cdft_classes", "[1, 2, 3, 4]", "cdft_classes is not a list of strings"),
])
def test_damaged_metadata_is_one_line(run, tmp_path, key, raw, problem, picture):
    model = _rewrite(run / "stage1-frt" / "best.safetensors", tmp_path / "m.safetensors", **{key: raw})
    for args in (("eval", str(model), "--device", "cpu", "--num-workers", "0"),
                 ("predict", str(model), str(picture), "-o", str(tmp_path / "p.csv"), "--device", "cpu")):
        code, _, err = invoke(*args)
        line = _one_error_line(err)
        assert code == 1, err
        assert line == (f"cdft: error: {str(model)!r} has damaged metadata ({problem}); it was not written by this "
                        f"cdft, or the file is corrupt"), line


@pytest.mark.slow
@pytest.mark.parametrize(("change", "expected"), [
    ({"image_size": "x"}, "a bad image_size ('x', not an integer from 8 to 8192)"),
    ({"image_size": 100_000}, "a bad image_size (100000, not an integer from 8 to 8192)"),
    ({"num_classes": "4"}, "a bad num_classes ('4', not an integer from 1 to 100000)"),
    ({"num_classes": 100_001}, "a bad num_classes (100001, not an integer from 1 to 100000)"),
    ({"backbone": ["x"]}, "a bad backbone (['x'], not a name)"),
    ({"data_config": "x"}, "a data_config that is not a JSON object"),
    ({"dim": "x"}, "a bad dim ('x', not an integer)"),
])
def test_a_damaged_model_spec_is_one_line(run, tmp_path, change, expected):
    model = _rewrite(run / "stage1-frt" / "best.safetensors", tmp_path / "m.safetensors",
                     cdft_spec=dict(_spec(run), **change), cdft_classes=None)  # eval takes the data's classes
    code, _, err = invoke("eval", str(model), "--device", "cpu", "--num-workers", "0")
    line = _one_error_line(err)
    assert code == 1 and f"model spec has {expected};" in line, err


@pytest.mark.slow
def test_class_names_must_match_the_heads_outputs(run, tmp_path, picture):
    spec = _spec(run)
    model = _rewrite(run / "stage1-frt" / "best.safetensors", tmp_path / "m.safetensors",
                     cdft_spec=dict(spec, num_classes=spec["num_classes"] + 1))
    for args in (("eval", str(model), "--device", "cpu", "--num-workers", "0"),
                 ("predict", str(model), str(picture), "-o", str(tmp_path / "p.csv"), "--device", "cpu")):
        code, _, err = invoke(*args)
        line = _one_error_line(err)
        assert code == 1, err
        assert (f"has damaged metadata ({spec['num_classes']} class names but num_classes "
                f"{spec['num_classes'] + 1} in its model spec)") in line, line


def test_model_from_spec_refuses_a_huge_head_before_allocating():
    from cdft_core.errors import CdftError
    from cdft_core.models.model import build_model, model_from_spec

    spec = dict(build_model("test_vit", "none", 3, pretrained=False, image_size=32).spec)
    with pytest.raises(CdftError, match=r"a bad num_classes \(400000000, not an integer from 1 to 100000\)"):
        model_from_spec(dict(spec, num_classes=400_000_000))
    with pytest.raises(CdftError, match=r"a bad image_size \(True,"):
        model_from_spec(dict(spec, image_size=True))


# -- resume states ---------------------------------------------------------------------
def _damage_record(run_dir: Path, damage) -> Path:
    record = sorted((run_dir / "resume").glob("*.json"))[-1]
    text = record.read_text()
    if callable(damage):
        data = json.loads(text)
        damage(data)
        record.write_text(json.dumps(data))
    else:
        record.write_text(text[: len(text) // 2])
    return record


@pytest.mark.slow
@pytest.mark.parametrize(("damage", "why"), [
    (None, ""),  # a truncated record
    (lambda r: r.update(progress="garbage"), "progress is not a JSON object"),
    (lambda r: r.update(model_file="/etc/passwd"), "model_file '/etc/passwd' is not a file inside the run"),
    (lambda r: r.update(state_file="../../etc/passwd"), "state_file '../../etc/passwd' is not a file inside the run"),
    (lambda r: r.update(model_file="resume/nothing.safetensors"), "nothing.safetensors is missing"),
    (lambda r: r.update(rng=[{"python": 1}]), "an RNG state is not the one cdft writes"),
    (lambda r: r["progress"].update(epoch="x"), "progress.epoch has the wrong type ('x')"),
    (lambda r: r["progress"].update(stage_index=-1), "progress.stage_index is negative"),
    (lambda r: r["progress"].update(stages={}), "progress.stages has the wrong type ({})"),
])
def test_a_damaged_resume_state_is_one_line(interrupted, tmp_path, damage, why):
    copy = _copy(interrupted, tmp_path)
    record = _damage_record(copy, damage)
    code, _, err = invoke("run", "--resume", str(copy))
    line = _one_error_line(err)
    assert code == 1, err
    assert f"resume state {str(record)!r} is damaged (" in line and why in line, line
    assert line.endswith("; start a new run, or resume from an intact copy of the run"), line


@pytest.mark.slow
def test_a_damaged_resume_tensor_file_is_one_line(interrupted, tmp_path):
    copy = _copy(interrupted, tmp_path)
    state = sorted((copy / "resume").glob("*.state.safetensors"))[-1]
    state.write_bytes(state.read_bytes()[:100])
    code, _, err = invoke("run", "--resume", str(copy))
    line = _one_error_line(err)
    assert code == 1 and "is damaged (" in line and "is not a readable safetensors file" in line, err
    model = sorted((copy / "resume").glob("*.model.safetensors"))[-1]
    model.unlink()
    model.symlink_to("/dev/zero")
    code, _, err = invoke("run", "--resume", str(copy))
    line = _one_error_line(err)
    assert code == 1 and "is damaged (" in line and "is not a regular file" in line, err


@pytest.mark.slow
def test_resume_weights_of_another_model_are_a_damaged_state(interrupted, tmp_path):
    """A resume state whose weights belong to another model (files mixed up between runs):
    one line naming the state, not torch's list of every missing and unexpected key."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    copy = _copy(interrupted, tmp_path)
    model_file = sorted((copy / "resume").glob("*.model.safetensors"))[-1]
    renamed = {f"other.{key}": value for key, value in load_file(str(model_file)).items()}
    with safe_open(str(model_file), "pt") as handle:
        metadata = handle.metadata()
    save_file(renamed, str(model_file), metadata=metadata)
    code, _, err = invoke("run", "--resume", str(copy))
    line = _one_error_line(err)
    assert code == 1 and "is damaged (its weights do not fit this run's model: " in line, err
    assert line.endswith("; start a new run, or resume from an intact copy of the run"), line


def test_a_huge_sparse_summary_is_damaged_not_parsed(tmp_path):
    """A 1 GB summary.json (sparse: a few kB on disk) took 2.6 GB to parse; a record is kilobytes."""
    from cdft_core.errors import UsageError
    from cdft_core.training.evaluation import find_checkpoint

    run = tmp_path / "run"
    run.mkdir()
    with open(run / "summary.json", "wb") as handle:
        handle.truncate(1 << 30)
    with pytest.raises(UsageError, match=r"summary.json' is damaged \(it does not name a checkpoint"):
        find_checkpoint(str(run))


@pytest.mark.slow
@pytest.mark.parametrize("edit", ["shape", "nesting"])
def test_an_edited_checkpoint_is_one_line_naming_it(run, tmp_path, edit):
    """A tensor of another shape gave torch's several 'size mismatch' lines; metadata nested
    100,000 deep a bare RecursionError."""
    import torch
    from safetensors.torch import load_file, save_file

    from cdft_core.training.checkpoint import read_model

    source = run / "stage1-frt" / "best.safetensors"
    tensors = load_file(str(source))
    _, meta = read_model(str(source))
    metadata = {k: json.dumps(v) for k, v in meta.items() if k != "checkpoint"}
    if edit == "shape":
        key = next(k for k in tensors if k.endswith("attn.proj.bias"))
        tensors[key] = torch.zeros(3, 3, 3)
    else:
        metadata["cdft_spec"] = "[" * 100_000 + "]" * 100_000
    edited = tmp_path / "edited.safetensors"
    save_file(tensors, str(edited), metadata=metadata)
    code, _, err = invoke("eval", str(edited))
    line = _one_error_line(err)
    assert code == 1 and str(edited) in line, err
    expected = "does not fit its own model spec (1 tensor(s) of another shape" if edit == "shape" else "has damaged metadata"
    assert expected in line and "RecursionError" not in line
