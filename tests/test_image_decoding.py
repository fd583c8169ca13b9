"""decode_image keeps every common PNG/TIFF/JPEG mode's range: real files, exact pixels.

Pillow writes most of the files; the 16-bit colour PNGs and TIFFs (which Pillow cannot
write) come from the small writers below, which follow the PNG and TIFF specifications.
"""

from __future__ import annotations

import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from cdft_core.data.images import decode_image
from cdft_core.errors import CdftError


def expected_8bit(values, peak=65535):
    """round(v * 255 / peak), computed independently of the implementation."""
    return np.floor(np.asarray(values, dtype=np.float64) * 255.0 / peak + 0.5).astype(np.uint8)


def decode_file(path) -> np.ndarray:
    """decode_image on a file's bytes, as an H×W×3 array; checks the tensor contract and
    that decoding raises no warning (a per-image warning floods a data loader)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tensor = decode_image(path.read_bytes(), path.name)
    assert tensor.dtype == torch.uint8 and tensor.ndim == 3 and tensor.shape[0] == 3
    return tensor.permute(1, 2, 0).numpy()


def pillow_file(tmp_path, image, name, **options):
    path = tmp_path / name
    image.save(path, **options)
    return path


def opened_mode(path) -> str:
    with Image.open(path) as image:
        return image.mode


def grey(array):
    return np.repeat(np.asarray(array)[..., None], 3, axis=2)


def png_bytes(samples, color_type, bit_depth=16, interlace=False, filters=(0, 1, 2)):
    """A PNG of ``samples`` (H×W or H×W×C), rows cycling through the None/Sub/Up filters,
    optionally Adam7-interlaced, so the decoder's unfiltering is exercised too."""
    samples = np.asarray(samples)
    height, width = samples.shape[:2]
    channels = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[color_type]
    bytes_per_pixel = max(1, channels * bit_depth // 8)

    def packed(block):
        flat = block.reshape(block.shape[0], -1)
        if bit_depth == 16:
            return flat.astype(">u2").view(np.uint8)
        if bit_depth == 8:
            return flat.astype(np.uint8)
        per_byte = 8 // bit_depth
        flat = np.pad(flat.astype(np.uint8), ((0, 0), (0, (-flat.shape[1]) % per_byte)))
        grouped = flat.reshape(flat.shape[0], -1, per_byte)
        out = np.zeros(grouped.shape[:2], np.uint8)
        for i in range(per_byte):
            out |= grouped[..., i] << (8 - bit_depth * (i + 1))
        return out

    def scanlines(block):
        raw = packed(block).astype(np.int16)
        lines = []
        for y in range(raw.shape[0]):
            kind, row = filters[y % len(filters)], raw[y]
            if kind == 1:  # Sub: minus the byte one pixel to the left
                row = row - np.concatenate([np.zeros(bytes_per_pixel, np.int16), row[:-bytes_per_pixel]])
            elif kind == 2:  # Up: minus the byte above
                row = row - (raw[y - 1] if y else 0)
            lines.append(bytes([kind]) + (row % 256).astype(np.uint8).tobytes())
        return b"".join(lines)

    if interlace:
        passes = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
        blocks = (samples[y0::dy, x0::dx] for x0, y0, dx, dy in passes)
        raw = b"".join(scanlines(block) for block in blocks if block.size)
    else:
        raw = scanlines(samples)

    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, int(interlace))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def tiff_bytes(samples, photometric, *, order="<", deflate=False, sample_format=1, extra_samples=None, packed=None):
    """A one-strip TIFF of ``samples`` in its dtype (uint16, int32, float32...), little
    (``<``) or big (``>``) endian, uncompressed or Adobe-deflate (read through libtiff).
    ``packed`` = ``(bits, strip)`` stores an already bit-packed strip instead."""
    samples = np.asarray(samples)
    height, width = samples.shape[:2]
    per_pixel = 1 if samples.ndim == 2 else samples.shape[2]
    bits = samples.dtype.itemsize * 8
    strip = samples.astype(samples.dtype.newbyteorder(order)).tobytes()
    if packed is not None:
        bits, strip = packed
    if deflate:
        strip = zlib.compress(strip)
    entries = [
        (256, (width,)),
        (257, (height,)),
        (258, (bits,) * per_pixel),
        (259, (8 if deflate else 1,)),
        (262, (photometric,)),
        (273, (0,)),  # StripOffsets, filled in below
        (277, (per_pixel,)),
        (278, (height,)),
        (279, (len(strip),)),
        (284, (1,)),
        (339, (sample_format,) * per_pixel),
    ]
    if extra_samples is not None:
        entries.append((338, (extra_samples,)))
    entries.sort()
    first_ifd = 8
    overflow_at = first_ifd + 2 + 12 * len(entries) + 4
    overflow = sum(2 * len(values) for _, values in entries if len(values) > 2)  # SHORTs beyond 4 bytes
    strip_at = overflow_at + overflow
    fields, blobs = [], b""
    for tag, values in entries:
        kind, fmt = (4, "I") if tag in (256, 257, 273, 278, 279) else (3, "H")
        values = (strip_at,) if tag == 273 else values
        payload = struct.pack(order + fmt * len(values), *values)
        if len(payload) <= 4:
            fields.append(struct.pack(order + "HHI", tag, kind, len(values)) + payload.ljust(4, b"\0"))
        else:
            fields.append(struct.pack(order + "HHII", tag, kind, len(values), overflow_at + len(blobs)))
            blobs += payload
    assert len(blobs) == overflow
    head = (b"II*\0" if order == "<" else b"MM\0*") + struct.pack(order + "I", first_ifd)
    return (
        head + struct.pack(order + "H", len(entries)) + b"".join(fields) + struct.pack(order + "I", 0) + blobs + strip
    )


def written(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return path


RAMP16 = np.linspace(0, 65535, 64).round().astype(np.uint16)  # 0, 1040, ..., 65535


# --- 16-bit greyscale -------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "mode"),
    [
        ("png", "I;16"),
        ("tiff-little", "I;16"),
        ("tiff-big", "I;16B"),
        ("tiff-big-deflate", "I;16B"),
        ("tiff-int32", "I"),
    ],
)
def test_16bit_grey_ramp_spans_0_to_255_monotonically(tmp_path, kind, mode):
    ramp = np.tile(RAMP16, (2, 1))
    if kind == "png":
        path = pillow_file(tmp_path, Image.fromarray(ramp), "ramp.png")
    elif kind == "tiff-int32":  # Pillow's working mode for 16-bit data, stored as 32-bit signed
        path = written(tmp_path, "ramp.tif", tiff_bytes(ramp.astype(np.int32), 1, sample_format=2))
    else:
        order = "<" if kind == "tiff-little" else ">"
        path = written(tmp_path, "ramp.tif", tiff_bytes(ramp, 1, order=order, deflate=kind.endswith("deflate")))
    assert opened_mode(path) == mode
    got = decode_file(path)
    assert got.shape == (2, 64, 3)
    assert np.array_equal(got, grey(expected_8bit(ramp)))
    row = got[0, :, 0].astype(int)
    assert row[0] == 0 and row[-1] == 255 and np.all(np.diff(row) > 0)


def test_16bit_grey_midpoint_and_rounding(tmp_path):
    values = np.array([[0, 128, 129, 32767, 32768, 65279, 65280, 65535]], np.uint16)
    got = decode_file(pillow_file(tmp_path, Image.fromarray(values), "mid.png"))[0, :, 0]
    # value*255/65535 = value/257, rounded: 32767 -> 127.498, 32768 -> 127.502, 65280 -> 254.0
    assert got.tolist() == [0, 0, 1, 127, 128, 254, 254, 255]


def test_16bit_ramp_is_not_saturated(tmp_path):
    """Clipping 16-bit values at 255 (Pillow's own I;16 -> RGB) turns all but the first
    pixels of a ramp white; scaling keeps a uniform spread."""
    ramp = np.tile(RAMP16, (4, 1))
    with Image.open(pillow_file(tmp_path, Image.fromarray(ramp), "ramp16.png")) as image:
        clipped = np.asarray(image.convert("RGB"))
    assert (clipped == 255).mean() > 0.9  # the failure this guards against
    got = decode_file(tmp_path / "ramp16.png")
    assert (got == 255).mean() < 0.05
    assert abs(float(got.mean()) - 127.5) < 2
    assert len(np.unique(got)) == 64


def test_12bit_tiff_scales_by_its_bit_depth(tmp_path):
    """A 12-bit TIFF opens as I;16 with values 0..4095: its full scale is 4095, not 65535."""
    values = np.array([[0, 1, 2048, 4094, 4095, 1000]], np.uint16)
    strip = bytearray()
    for a, b in zip(values[0, ::2].tolist(), values[0, 1::2].tolist(), strict=True):  # two samples in 3 bytes
        strip += bytes([a >> 4, ((a & 0xF) << 4) | (b >> 8), b & 0xFF])
    path = written(tmp_path, "twelve.tif", tiff_bytes(values, 1, packed=(12, bytes(strip))))
    assert opened_mode(path) == "I;16"
    assert decode_file(path)[0, :, 0].tolist() == expected_8bit(values[0], 4095).tolist() == [0, 0, 128, 255, 255, 62]


# --- 16-bit colour ----------------------------------------------------------------


def distinct_rgb16(height=8):
    """R rises, G falls, B is 0xFF00 (254 when scaled, 255 if the low byte were dropped)."""
    red = np.tile(RAMP16, (height, 1))
    return np.stack([red, 65535 - red, np.full_like(red, 0xFF00)], axis=-1)


@pytest.mark.parametrize("interlace", [False, True], ids=["plain", "adam7"])
def test_16bit_rgb_png_keeps_distinct_channels(tmp_path, interlace):
    rgb = distinct_rgb16()
    path = written(tmp_path, "rgb16.png", png_bytes(rgb, 2, interlace=interlace))
    assert opened_mode(path) == "RGB"  # Pillow opens it 8 bits a band
    got = decode_file(path)
    assert np.array_equal(got, expected_8bit(rgb))
    assert np.all(got[..., 2] == 254)
    assert got[0, 0].tolist() == [0, 255, 254] and got[0, -1].tolist() == [255, 0, 254]
    assert np.all(np.diff(got[0, :, 0].astype(int)) > 0) and np.all(np.diff(got[0, :, 1].astype(int)) < 0)


@pytest.mark.parametrize("interlace", [False, True], ids=["plain", "adam7"])
def test_16bit_rgba_and_grey_alpha_png_drop_alpha(tmp_path, interlace):
    rgb = distinct_rgb16()
    alpha = np.tile(np.array([0, 1000, 65535], np.uint16), 22)[:64][None].repeat(8, 0)
    rgba = written(tmp_path, "rgba16.png", png_bytes(np.dstack([rgb, alpha]), 6, interlace=interlace))
    assert np.array_equal(decode_file(rgba), expected_8bit(rgb))
    la = written(tmp_path, "la16.png", png_bytes(np.dstack([rgb[..., 0], alpha]), 4, interlace=interlace))
    assert opened_mode(la) == "RGBA"
    assert np.array_equal(decode_file(la), grey(expected_8bit(rgb[..., 0])))


@pytest.mark.parametrize("order", ["<", ">"], ids=["little", "big"])
@pytest.mark.parametrize("deflate", [False, True], ids=["raw", "deflate"])
def test_16bit_rgb_rgba_and_cmyk_tiff(tmp_path, order, deflate):
    rgb = distinct_rgb16(height=4)
    path = written(tmp_path, "rgb16.tif", tiff_bytes(rgb, 2, order=order, deflate=deflate))
    assert np.array_equal(decode_file(path), expected_8bit(rgb))
    alpha = np.full(rgb.shape[:2] + (1,), 7, np.uint16)
    path = written(
        tmp_path, "rgba16.tif", tiff_bytes(np.dstack([rgb, alpha]), 2, order=order, deflate=deflate, extra_samples=2)
    )
    assert opened_mode(path) == "RGBA"
    assert np.array_equal(decode_file(path), expected_8bit(rgb))
    cyan = rgb[..., 0]
    cmyk = np.stack([cyan, np.zeros_like(cyan), np.full_like(cyan, 65535), np.zeros_like(cyan)], axis=-1)
    path = written(tmp_path, "cmyk16.tif", tiff_bytes(cmyk, 5, order=order, deflate=deflate))
    got = decode_file(path)
    assert np.array_equal(got[..., 0], 255 - expected_8bit(cyan))  # R = 255 - C when K = 0
    assert np.all(got[..., 1] == 255) and np.all(got[..., 2] == 0)


# --- 8-bit modes ------------------------------------------------------------------


PALETTE = [255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30]


def palette_image():
    image = Image.new("P", (4, 2))
    image.putpalette(PALETTE)
    image.frombytes(bytes([0, 1, 2, 3, 3, 2, 1, 0]))
    return image


@pytest.mark.parametrize(
    ("name", "options"),
    [
        ("plain.png", {}),
        ("one-transparent.png", {"transparency": 1}),
        ("per-entry-alpha.png", {"transparency": bytes([255, 0, 128, 255])}),
        ("transparent.gif", {"transparency": 2}),
    ],
)
def test_palette_expands_through_its_palette(tmp_path, name, options):
    path = pillow_file(tmp_path, palette_image(), name, **options)
    assert opened_mode(path) == "P"
    colours = np.array(PALETTE, np.uint8).reshape(4, 3)
    assert np.array_equal(decode_file(path), colours[[[0, 1, 2, 3], [3, 2, 1, 0]]])


def test_grey_alpha_and_rgba_keep_colour_and_drop_alpha(tmp_path):
    la = Image.fromarray(np.array([[[0, 255], [100, 0], [200, 128], [255, 7]]], np.uint8))
    path = pillow_file(tmp_path, la, "la.png")
    assert opened_mode(path) == "LA"
    assert np.array_equal(decode_file(path), grey([[0, 100, 200, 255]]))
    rgba = Image.fromarray(np.array([[[10, 20, 30, 0], [40, 50, 60, 128], [70, 80, 90, 255]]], np.uint8))
    path = pillow_file(tmp_path, rgba, "rgba.png")
    assert opened_mode(path) == "RGBA"
    assert decode_file(path)[0].tolist() == [[10, 20, 30], [40, 50, 60], [70, 80, 90]]  # not composited on black


def test_low_bit_depth_grey_png_spans_full_range(tmp_path):
    for bits in (1, 2, 4):
        levels = np.arange(2**bits)[None].repeat(2, 0)
        path = written(tmp_path, f"grey{bits}.png", png_bytes(levels, 0, bit_depth=bits, filters=(0,)))
        assert decode_file(path)[0, :, 0].tolist() == expected_8bit(levels[0], 2**bits - 1).tolist()


def cmyk_image():
    """Cyan, magenta, yellow, black, 50% black, white."""
    pixels = [(255, 0, 0, 0), (0, 255, 0, 0), (0, 0, 255, 0), (0, 0, 0, 255), (0, 0, 0, 128), (0, 0, 0, 0)]
    return Image.frombytes("CMYK", (6, 1), b"".join(bytes(p) for p in pixels))


CMYK_AS_RGB = [[0, 255, 255], [255, 0, 255], [255, 255, 0], [0, 0, 0], [127, 127, 127], [255, 255, 255]]


@pytest.mark.parametrize("compression", [None, "tiff_lzw"])
def test_cmyk_tiff(tmp_path, compression):
    path = pillow_file(tmp_path, cmyk_image(), "cmyk.tif", compression=compression)
    assert opened_mode(path) == "CMYK"
    assert decode_file(path)[0].tolist() == CMYK_AS_RGB


def test_cmyk_jpeg(tmp_path):
    blocks = Image.new("CMYK", (48, 16))
    for x, colour in ((0, (255, 0, 0, 0)), (16, (0, 0, 0, 128)), (32, (0, 255, 255, 0))):
        blocks.paste(colour, (x, 0, x + 16, 16))
    path = pillow_file(tmp_path, blocks, "cmyk.jpg", quality=95)
    assert opened_mode(path) == "CMYK"
    centres = decode_file(path)[8, [8, 24, 40]].astype(int)
    assert np.abs(centres - np.array([[0, 255, 255], [127, 127, 127], [255, 0, 0]])).max() <= 4


@pytest.mark.parametrize(
    ("name", "options"), [("bits.png", {}), ("bits.tif", {}), ("g4.tif", {"compression": "group4"})]
)
def test_bilevel(tmp_path, name, options):
    path = pillow_file(tmp_path, Image.fromarray(np.array([[0, 1, 1, 0], [1, 0, 0, 1]], bool)), name, **options)
    assert opened_mode(path) == "1"
    assert np.array_equal(decode_file(path), grey([[0, 255, 255, 0], [255, 0, 0, 255]]))


# --- float ------------------------------------------------------------------------


def test_float_tiff_in_unit_range_scales_by_255(tmp_path):
    values = np.array([[0.0, 0.25, 0.5, 1.0, np.nan, -0.1]], np.float32)
    path = pillow_file(tmp_path, Image.fromarray(values), "unit.tif")
    assert opened_mode(path) == "F"
    assert decode_file(path)[0, :, 0].tolist() == [0, 64, 128, 255, 0, 0]


def test_float_tiff_beyond_unit_range_is_on_the_0_255_scale(tmp_path):
    values = np.array([[0.0, 1.5, 100.4, 254.6, 255.0, 300.0, -5.0]], np.float32)
    path = pillow_file(tmp_path, Image.fromarray(values), "bytes.tif")
    assert decode_file(path)[0, :, 0].tolist() == [0, 2, 100, 255, 255, 255, 0]


@pytest.mark.parametrize("order", ["<", ">"], ids=["little", "big"])
@pytest.mark.parametrize("deflate", [False, True], ids=["raw", "deflate"])
def test_float_tiff_any_byte_order_and_compression(tmp_path, order, deflate):
    ramp = np.linspace(0.0, 1.0, 32, dtype=np.float32)[None].repeat(2, 0)
    path = written(tmp_path, "ramp.tif", tiff_bytes(ramp, 1, order=order, deflate=deflate, sample_format=3))
    assert opened_mode(path) == "F"
    assert np.array_equal(decode_file(path), grey(np.floor(ramp.astype(np.float64) * 255 + 0.5).astype(np.uint8)))


def test_signed_16bit_tiff_scales_by_its_positive_range(tmp_path):
    values = np.array([[-100, 0, 16384, 32767]], np.int16)
    for deflate in (False, True):
        path = written(tmp_path, "signed.tif", tiff_bytes(values, 1, order=">", deflate=deflate, sample_format=2))
        assert opened_mode(path) == "I"
        assert decode_file(path)[0, :, 0].tolist() == [0, 0, 128, 255]


# --- unchanged behaviour ----------------------------------------------------------


def test_plain_rgb_and_grey_decode_as_before(tmp_path):
    rgb = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3) * 4
    path = pillow_file(tmp_path, Image.fromarray(rgb), "rgb.png")
    assert np.array_equal(decode_file(path), rgb)
    tensor = decode_image(path.read_bytes(), "rgb.png")
    assert tensor.shape == (3, 4, 5) and tensor.is_contiguous()
    path = pillow_file(tmp_path, Image.fromarray(rgb[..., 0]), "l.tif")
    assert np.array_equal(decode_file(path), grey(rgb[..., 0]))


def test_undecodable_data_is_a_one_line_error_naming_the_file(tmp_path, monkeypatch):
    with pytest.raises(CdftError, match=r"'empty\.png'.*empty"):
        decode_image(b"", "empty.png")
    with pytest.raises(CdftError, match=r"'junk\.png' \(not an image format Pillow reads\)"):
        decode_image(b"not an image at all", "junk.png")
    whole = png_bytes(distinct_rgb16(), 2)
    with pytest.raises(CdftError, match=r"cannot decode image 'cut\.png'") as caught:
        decode_image(whole[: len(whole) // 2], "cut.png")
    assert "\n" not in str(caught.value)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    with pytest.raises(CdftError, match=r"cannot decode image 'huge\.png' \(.*decompression bomb"):
        decode_image(png_bytes(distinct_rgb16(), 2), "huge.png")


def test_a_large_image_below_pillows_bomb_limit_decodes_without_its_raw_warning(recwarn, monkeypatch):
    """Pillow warns between MAX_IMAGE_PIXELS and twice that: its two raw lines reached stderr."""
    import io as _io

    from PIL import Image

    from cdft_core.data.images import decode_image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40x40 = 1600 pixels: past the warning, below 2x
    buffer = _io.BytesIO()
    Image.new("RGB", (40, 40), (10, 20, 30)).save(buffer, format="PNG")
    assert tuple(decode_image(buffer.getvalue(), "big.png").shape) == (3, 40, 40)
    assert not [w for w in recwarn if issubclass(w.category, Image.DecompressionBombWarning)]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # past twice the limit: still refused, in one line
    with pytest.raises(CdftError, match=r"cannot decode image 'big.png' \(Image size \(1600 pixels\) exceeds limit"):
        decode_image(buffer.getvalue(), "big.png")
