"""Review fixes of ``cdft predict``/``embed``/``eval``: every input row is an output row
(repeats included, so groups stay complete); a file that is not a checkpoint is a usage
error; backbone-only ``embed`` options with a run are refused; the empty ``embed`` count
line reads like explain's; ``embed -o`` takes only .safetensors or .parquet; and the
``predict --help`` grouping example groups by patient, as the docs do."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch
from helpers_engine import invoke, staged_run

BACKBONE = ("--backbone", "test_vit", "--no-pretrained", "--image-size", "32")
QUICK = ("--num-workers", "0", "--device", "cpu")


def _image(path: Path, value: int = 0) -> Path:
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((40, 40, 3), value, dtype=np.uint8)).save(path)
    return path


def _error_line(code: int, err: str, exit_code: int) -> str:
    assert code == exit_code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cdft: error: "), err
    return lines[0]


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def folder(tmp_path) -> Path:
    images = tmp_path / "odd"
    images.mkdir()
    _image(images / "gray.png", 90)
    _image(images / "dark.png", 10)
    return images


def test_collect_inputs_keeps_repeats_when_asked(folder):
    from cdft_core.inference.inputs import collect_inputs, distinct_images

    arguments = [str(folder), str(folder / "gray.png")]
    assert len(collect_inputs(arguments)) == 2  # explain: one overlay per distinct image
    images = collect_inputs(arguments, keep_repeats=True)
    assert [i.path for i in images] == [str(folder / "dark.png"), str(folder / "gray.png"), str(folder / "gray.png")]
    distinct, slot = distinct_images(images)
    assert [i.path for i in distinct] == [str(folder / "dark.png"), str(folder / "gray.png")] and slot == [0, 1, 1]


@pytest.mark.slow
def test_predict_keeps_every_input_row_and_every_group(tmp_path_factory, folder, tmp_path):
    run = staged_run(tmp_path_factory)
    listing = tmp_path / "dup.csv"
    listing.write_text("image_path,pid\nodd/gray.png,A\nodd/dark.png,A\nodd/gray.png,B\n")
    out = tmp_path / "d.csv"
    code, stdout, err = invoke("predict", str(run), str(listing), "-o", str(out), "--group-by", "column:pid", *QUICK)
    assert code == 0, err
    assert stdout.strip().splitlines()[-1].startswith(f"3 images, 0 could not be read (listed in {out})")
    rows = _rows(out)
    assert [(r["path"], r["group"]) for r in rows] == [(str(tmp_path / "odd/gray.png"), "A"),
                                                       (str(tmp_path / "odd/dark.png"), "A"),
                                                       (str(tmp_path / "odd/gray.png"), "B")]
    assert rows[0]["prob_" + rows[0]["predicted"]] == rows[2]["prob_" + rows[2]["predicted"]]
    groups = {g["group"]: g for g in _rows(tmp_path / "d-groups.csv")}
    assert sorted(groups) == ["A", "B"] and groups["A"]["images"] == "2" and groups["B"]["images"] == "1"

    code, stdout, err = invoke("predict", str(run), str(folder), str(folder / "gray.png"), "-o", str(out), *QUICK)
    assert code == 0, err
    assert stdout.strip().splitlines()[-1] == f"3 images, 0 could not be read (listed in {out})"
    assert [r["path"] for r in _rows(out)][-1] == str(folder / "gray.png")


def test_embed_keeps_repeated_inputs_as_rows(folder, tmp_path):
    from cdft_core.inference.embed import read_embeddings

    out = tmp_path / "f.safetensors"
    code, stdout, err = invoke("embed", *BACKBONE, str(folder), str(folder / "gray.png"), "-o", str(out), *QUICK)
    assert code == 0, err
    assert stdout.strip().splitlines()[-1] == f"3 images, 0 could not be read (listed in {out})"
    paths, features, _ = read_embeddings(str(out))
    assert paths == [str(folder / "dark.png"), str(folder / "gray.png"), str(folder / "gray.png")]
    assert features.shape[0] == 3 and torch.equal(features[1], features[2])


@pytest.mark.parametrize("command", ["eval", "predict"])
def test_a_file_that_is_not_a_checkpoint_is_a_usage_error(command, folder, tmp_path):
    split = tmp_path / "split.csv"
    split.write_text("image_path,label,fold\na.png,x,0\n" * 50)
    extra = (str(folder / "gray.png"), "-o", str(tmp_path / "x.csv")) if command == "predict" else ()
    code, _, err = invoke(command, str(split), *extra)
    line = _error_line(code, err, 2)
    assert line == (f"cdft: error: {str(split)!r} is not a model checkpoint; pass a run directory or a "
                    f".safetensors checkpoint written by cdft run")


@pytest.mark.parametrize("option", [("--image-size", "64"), ("--no-pretrained",), ("--weights", "w.safetensors")])
def test_embed_refuses_backbone_only_options_with_a_run(option, folder, tmp_path):
    code, _, err = invoke("embed", str(tmp_path / "run"), str(folder), *option, "-o", str(tmp_path / "e.safetensors"))
    assert f"{option[0]} applies to --backbone NAME" in _error_line(code, err, 2)


def test_embed_with_nothing_readable_says_where_the_errors_are(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"junk")
    out = tmp_path / "e.safetensors"
    code, stdout, err = invoke("embed", *BACKBONE, str(bad), "-o", str(out), *QUICK)
    assert code == 1, err
    assert stdout.strip().splitlines()[-1] == "1 images, 1 could not be read (listed in the lines above; nothing written)"
    assert f"cannot read {bad}: " in err and not out.exists()


@pytest.mark.parametrize("name", ["features.npy", "features.pt", "features"])
def test_embed_refuses_an_output_it_does_not_write(name, folder, tmp_path):
    out = tmp_path / name
    code, _, err = invoke("embed", *BACKBONE, str(folder), "-o", str(out), *QUICK)
    assert "must end in .safetensors or .parquet" in _error_line(code, err, 2)
    assert not out.exists()


def test_predict_help_groups_by_patient_as_the_docs_do():
    code, stdout, _ = invoke("predict", "--help")
    patient = r"--group-by 'SOB_[BM]_[A-Z]+-\d+-(\d+)'"
    assert code == 0 and patient in stdout and r"(\w+)" not in stdout
    assert patient in (Path(__file__).resolve().parents[1] / "docs" / "inference.md").read_text()


def test_a_repeated_image_counts_once_in_its_group():
    import numpy as np

    from cdft_core.inference.predict import PredictionTable, group_table

    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.1, 0.9], [0.9, 0.1]], dtype=np.float32)
    table = PredictionTable(["a", "b"], ["x.png", "x.png", "y.png", "x.png"], probabilities, ["", "", "", ""],
                            ["g", "g", "g", "h"])
    rows = {row["group"]: row for row in group_table(table)}
    assert rows["g"]["images"] == 2 and rows["g"]["prob_a"] == pytest.approx(0.5)  # x once, y once
    assert rows["h"]["images"] == 1  # the same image in another group belongs to it too


def test_folders_globs_and_csvs_inside_a_zip_name_readable_members(tmp_path):
    """`zip://tiles::/x.zip` once gave members `zip://tiles::/x.zip/a.png` (unreadable), and a
    glob dropped the archive from its URLs."""
    import io
    import zipfile

    from PIL import Image

    from cdft_core.inference.inputs import collect_inputs, read_image

    archive = tmp_path / "tiles.zip"
    with zipfile.ZipFile(archive, "w") as bundle:
        for name in ("a", "b"):
            buffer = io.BytesIO()
            Image.new("RGB", (8, 6), (10, 20, 30)).save(buffer, format="PNG")
            bundle.writestr(f"tiles/{name}.png", buffer.getvalue())
        bundle.writestr("tiles/list.csv", "image_path,pid\na.png,1\nb.png,2\n")
        bundle.writestr("top.csv", "image_path\ntiles/a.png\n")
    for argument in (f"zip://tiles::{archive}", f"zip://tiles/*.png::{archive}", f"zip://tiles/list.csv::{archive}"):
        paths = [image.path for image in collect_inputs([argument])]
        assert paths == [f"zip://tiles/a.png::{archive}", f"zip://tiles/b.png::{archive}"], argument
        assert all(tuple(read_image(p).shape) == (3, 6, 8) for p in paths)
    assert [i.path for i in collect_inputs([f"zip://top.csv::{archive}"])] == [f"zip://tiles/a.png::{archive}"]
