"""Small synthetic datasets in the real folder layouts, for tests and ``cdft demo``.

:func:`make_synthetic_breakhis` writes the BreakHis v1 tree (docs/method.md#breakhis) with the real
folder and file naming, all 8 tumour types, all 4 magnifications and several patients
per type, plus the two traps of the real data:

- patient 13412 filed under both ductal and lobular carcinoma, with byte-identical
  images in the two folders (as in the real data);
- patient 29960 with two lettered slides, ``SOB_B_F-14-29960AB`` (fibroadenoma) and
  ``SOB_B_A-14-29960CD`` (adenosis).

Each type has its own colour and texture (stripes, dots, rings, checks at an angle and
frequency of its own), so a tiny randomly initialised model separates the classes at
32 px in a few epochs, also after the paper's flips, rotations and ±10 % brightness.
Patients differ slightly in tint and texture scale, so patient-level splits matter.

:func:`make_synthetic_hcrf` writes an HCRF-like tree: ``Normal``/``Abnormal`` folders,
PNG and TIFF images, and ground-truth masks (``*_GT.png`` and a ``masks/`` folder) that
the HCRF dataset must skip.

Both are deterministic from ``seed`` (same bytes every time) and write through fsspec,
so ``directory`` may be a local path or a URL such as ``memory://demo``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from cdft_core.errors import UsageError

#: BreakHis tumour types: (folder, code, benign/malignant letter, colour, texture).
BREAKHIS_TYPES: tuple[tuple[str, str, str, tuple[int, int, int], str], ...] = (
    ("adenosis", "A", "B", (225, 115, 205), "dots"),
    ("fibroadenoma", "F", "B", (115, 215, 220), "stripes"),
    ("phyllodes_tumor", "PT", "B", (240, 165, 55), "rings"),
    ("tubular_adenoma", "TA", "B", (150, 95, 230), "checks"),
    ("ductal_carcinoma", "DC", "M", (220, 55, 55), "stripes"),
    ("lobular_carcinoma", "LC", "M", (65, 190, 75), "dots"),
    ("mucinous_carcinoma", "MC", "M", (55, 85, 225), "rings"),
    ("papillary_carcinoma", "PC", "M", (230, 220, 65), "checks"),
)
MAGNIFICATIONS: tuple[int, ...] = (40, 100, 200, 400)
CROSS_TYPE_PATIENT = "13412"  # filed under DC and LC, identical images
LETTERED_PATIENT = "29960"  # slides 29960AB (F) and 29960CD (A)


def _join(directory: str, *parts: str) -> str:
    return "/".join([str(directory).rstrip("/"), *parts])


def _open_target(directory: str, name: str, overwrite: bool) -> tuple[Any, str, str]:
    from fsspec.core import url_to_fs
    from fsspec.implementations.local import LocalFileSystem

    from cdft_core.files import unwritable_reason

    root = _join(directory, name)
    fs, path = url_to_fs(root)
    if fs.exists(path) and fs.find(path) and not overwrite:
        raise UsageError(f"{root} already exists and is not empty; choose another directory or remove it")
    reason = unwritable_reason(path) if isinstance(fs, LocalFileSystem) else None
    if reason:
        raise UsageError(f"cannot write the data into {root}: {reason}; choose another directory")
    return fs, path, root


def _texture(rng: Any, kind: str, height: int, width: int, scale: float) -> Any:
    """A pattern in [0, 1] with a random phase and angle, so no two images are equal."""
    import numpy as np

    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    angle = rng.uniform(0, np.pi)
    u = x * np.cos(angle) + y * np.sin(angle)
    v = -x * np.sin(angle) + y * np.cos(angle)
    period = 9.0 * scale
    phase_u, phase_v = rng.uniform(0, period, size=2)
    if kind == "stripes":
        pattern = 0.5 + 0.5 * np.sin(2 * np.pi * (u + phase_u) / period)
    elif kind == "checks":
        pattern = ((np.floor((u + phase_u) / period) + np.floor((v + phase_v) / period)) % 2).astype(np.float64)
    elif kind == "dots":
        du = ((u + phase_u) % period) - period / 2
        dv = ((v + phase_v) % period) - period / 2
        pattern = (du**2 + dv**2 < (period * 0.3) ** 2).astype(np.float64)
    elif kind == "rings":
        cy, cx = rng.uniform(0, height), rng.uniform(0, width)
        pattern = 0.5 + 0.5 * np.cos(2 * np.pi * np.hypot(y - cy, x - cx) / period)
    else:  # pragma: no cover - the tables above name only the four kinds
        raise ValueError(kind)
    return pattern


def _image(rng: Any, colour: Sequence[int], kind: str, size: tuple[int, int], scale: float, tint: Any) -> bytes:
    """One PNG: the type's colour modulated by its texture, a patient tint, and noise."""
    import numpy as np
    from PIL import Image

    width, height = size
    pattern = _texture(rng, kind, height, width, scale)[..., None]
    base = np.asarray(colour, dtype=np.float64) + tint
    pixels = base * (0.55 + 0.45 * pattern) + rng.normal(0, 8, size=(height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def make_synthetic_breakhis(
    directory: str,
    *,
    seed: int = 0,
    patients_per_type: int = 3,
    images_per_magnification: int = 4,
    size: tuple[int, int] = (96, 64),
    overwrite: bool = False,
) -> str:
    """Write a synthetic ``BreaKHis_v1`` tree under ``directory``; return its data root.

    ``size`` is (width, height). With the defaults: 8 types × 3 patients × 4
    magnifications × 4 images, plus the two special patients: 448 PNGs, about 5 MB.
    """
    import numpy as np

    if patients_per_type < 1 or images_per_magnification < 1:
        raise UsageError("patients_per_type and images_per_magnification must be at least 1")
    fs, path, root = _open_target(directory, "BreaKHis_v1", overwrite)
    rng = np.random.RandomState(seed)
    reserved = {CROSS_TYPE_PATIENT, LETTERED_PATIENT}
    numbers: list[str] = []
    while len(numbers) < patients_per_type * len(BREAKHIS_TYPES):
        candidate = str(rng.randint(2000, 40000))
        if candidate not in reserved and candidate not in numbers:
            numbers.append(candidate)

    code_index = {code: i for i, (_, code, _, _, _) in enumerate(BREAKHIS_TYPES)}
    # (type index, slide id) per slide folder, in writing order
    slides = [
        (t, numbers[t * patients_per_type + p]) for t in range(len(BREAKHIS_TYPES)) for p in range(patients_per_type)
    ]
    slides += [(code_index["F"], LETTERED_PATIENT + "AB"), (code_index["A"], LETTERED_PATIENT + "CD")]
    slides += [(code_index["DC"], CROSS_TYPE_PATIENT)]

    def write(
        type_index: int, slide: str, images: dict[tuple[int, int], bytes] | None = None
    ) -> dict[tuple[int, int], bytes]:
        """Write one slide folder; ``images`` given: write those bytes instead of new ones."""
        folder, code, kind_letter, colour, texture = BREAKHIS_TYPES[type_index]
        group = "benign" if kind_letter == "B" else "malignant"
        slide_dir = f"SOB_{kind_letter}_{code}-14-{slide}"
        tint = rng.normal(0, 10, size=3)
        scale = rng.uniform(0.8, 1.25)
        written: dict[tuple[int, int], bytes] = {}
        for mag in MAGNIFICATIONS:
            mag_dir = _join(path, "histology_slides", "breast", group, "SOB", folder, slide_dir, f"{mag}X")
            fs.makedirs(mag_dir, exist_ok=True)
            for seq in range(1, images_per_magnification + 1):
                if images is not None:
                    data = images[(mag, seq)]
                else:
                    data = _image(rng, colour, texture, size, scale * (mag / 100) ** 0.25, tint)
                written[(mag, seq)] = data
                fs.pipe_file(_join(mag_dir, f"{slide_dir}-{mag}-{seq:03d}.png"), data)
        return written

    for type_index, slide in slides[:-1]:
        write(type_index, slide)
    cross = write(*slides[-1])
    # the same patient's images again, filed under lobular carcinoma (byte-identical)
    write(code_index["LC"], CROSS_TYPE_PATIENT, cross)
    return root


def make_synthetic_hcrf(
    directory: str,
    *,
    seed: int = 0,
    normal: int = 8,
    abnormal: int = 12,
    size: int = 64,
    overwrite: bool = False,
) -> str:
    """Write a synthetic HCRF-style tree (``HCRF/Normal``, ``HCRF/Abnormal``); return its root.

    Every third image is a TIFF; each abnormal image has a ground-truth mask, either
    next to it (``<name>_GT.png``) or in an ``Abnormal/masks/`` folder (``<name>.png``).
    """
    import numpy as np
    from PIL import Image

    fs, path, root = _open_target(directory, "HCRF", overwrite)
    rng = np.random.RandomState(seed)
    looks = {"Normal": ((205, 140, 190), "dots"), "Abnormal": ((120, 60, 150), "checks")}
    for folder, count in (("Normal", normal), ("Abnormal", abnormal)):
        colour, texture = looks[folder]
        fs.makedirs(_join(path, folder), exist_ok=True)
        for i in range(count):
            stem = f"{folder.lower()}_{i:03d}"
            png = _image(rng, colour, texture, (size, size), 1.0, rng.normal(0, 10, size=3))
            if i % 3 == 2:
                buffer = io.BytesIO()
                with Image.open(io.BytesIO(png)) as image:
                    image.save(buffer, format="TIFF")
                fs.pipe_file(_join(path, folder, f"{stem}.tiff"), buffer.getvalue())
            else:
                fs.pipe_file(_join(path, folder, f"{stem}.png"), png)
            if folder == "Abnormal":
                mask = np.zeros((size, size), dtype=np.uint8)
                mask[size // 4 : size // 2, size // 4 : size // 2] = 255
                buffer = io.BytesIO()
                Image.fromarray(mask, "L").save(buffer, format="PNG")
                if i % 2:
                    fs.makedirs(_join(path, folder, "masks"), exist_ok=True)
                    fs.pipe_file(_join(path, folder, "masks", f"{stem}.png"), buffer.getvalue())
                else:
                    fs.pipe_file(_join(path, folder, f"{stem}_GT.png"), buffer.getvalue())
    return root
