"""Safe image loading (modes, EXIF, paths, damaged files, bombs) and letterbox geometry against hand-computed cases."""
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from realdata import pattern, write_image
from torchvision import tv_tensors
from torchvision.transforms.v2 import functional as F

from clmtl.data.images import CachedImageDataset, SampleMeta, load_rgb
from clmtl.data.letterbox import Letterbox, letterbox_image
from clmtl.errors import DataError

# --- modes ----------------------------------------------------------------------------------------------------


def _rgb(tmp_path, image: Image.Image, name: str) -> np.ndarray:
    image.save(tmp_path / name)
    return load_rgb(name, tmp_path).permute(1, 2, 0).numpy()


def test_rgb_passes_through_unchanged(tmp_path):
    pixels = pattern(5, 7, seed=0)
    loaded = load_rgb(write_image(tmp_path / "a.png", pixels).name, tmp_path)
    assert loaded.dtype == torch.uint8 and loaded.shape == (3, 5, 7)
    assert np.array_equal(loaded.permute(1, 2, 0).numpy(), pixels)


def test_greyscale_and_palette_become_rgb(tmp_path):
    assert _rgb(tmp_path, Image.new("L", (2, 1), 77), "l.png").tolist() == [[[77, 77, 77]] * 2]
    palette = Image.new("P", (2, 1), 1)
    palette.putpalette([10, 20, 30, 200, 100, 50])
    palette.putpixel((0, 0), 0)
    assert _rgb(tmp_path, palette, "p.png").tolist() == [[[10, 20, 30], [200, 100, 50]]]


def test_alpha_is_composited_onto_black(tmp_path):
    rgba = Image.new("RGBA", (3, 1))
    for x, value in enumerate([(255, 0, 0, 0), (10, 20, 30, 255), (200, 100, 50, 128)]):
        rgba.putpixel((x, 0), value)
    loaded = _rgb(tmp_path, rgba, "rgba.png")[0].astype(int)
    assert loaded[0].tolist() == [0, 0, 0]  # fully transparent red reads black, not red
    assert loaded[1].tolist() == [10, 20, 30]
    assert np.abs(loaded[2] - np.array([200, 100, 50]) * 128 / 255).max() <= 1
    la = Image.new("LA", (1, 1), (200, 128))
    assert np.abs(_rgb(tmp_path, la, "la.png")[0, 0].astype(int) - 200 * 128 / 255).max() <= 1
    keyed = Image.new("P", (2, 1), 0)
    keyed.putpalette([250, 250, 250, 10, 20, 30])
    keyed.putpixel((1, 0), 1)
    keyed.info["transparency"] = 0  # palette entry 0 is transparent
    keyed.save(tmp_path / "keyed.png", transparency=0)
    assert load_rgb("keyed.png", tmp_path).permute(1, 2, 0).tolist() == [[[0, 0, 0], [10, 20, 30]]]


def test_cmyk_converts_by_the_standard_formula(tmp_path):
    cmyk = Image.new("CMYK", (3, 1))
    for x, value in enumerate([(0, 0, 0, 0), (255, 0, 0, 0), (0, 0, 0, 255)]):
        cmyk.putpixel((x, 0), value)
    assert _rgb(tmp_path, cmyk, "cmyk.tif").tolist() == [[[255, 255, 255], [0, 255, 255], [0, 0, 0]]]


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode.startswith("I;16")
    assert _rgb(tmp_path, image, "deep.png")[0, :, 0].tolist() == [0, 100, 255]


def test_exif_orientation_is_applied(tmp_path):
    pixels = pattern(16, 24, seed=1)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored image must be rotated 90 degrees clockwise for display
    Image.fromarray(pixels).save(tmp_path / "rotated.png", exif=exif)
    loaded = load_rgb("rotated.png", tmp_path).permute(1, 2, 0).numpy()
    assert np.array_equal(loaded, np.rot90(pixels, k=-1))


# --- paths ----------------------------------------------------------------------------------------------------


def test_paths_must_stay_inside_the_root(tmp_path):
    root, outside = tmp_path / "data", tmp_path / "secret.png"
    write_image(outside, pattern(4, 4, seed=0))
    write_image(root / "inside.png", pattern(4, 4, seed=0))
    os.symlink(outside, root / "leak.png")
    os.symlink(root / "inside.png", root / "alias.png")
    for path in ["../secret.png", str(outside), "leak.png", "sub/../../secret.png"]:
        with pytest.raises(DataError, match="outside the dataset root"):
            load_rgb(path, root)
    assert load_rgb("alias.png", root).shape == (3, 4, 4)  # a link that stays inside is fine
    assert load_rgb(str(root / "inside.png"), root).shape == (3, 4, 4)  # so is an absolute path inside


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(DataError, match="nope.jpg: file not found"):
        load_rgb("nope.jpg", tmp_path)


# --- damaged files and bombs ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["cut.jpg", "cut.png"])
def test_truncated_images_are_refused(tmp_path, name):
    path = write_image(tmp_path / name, pattern(48, 64, seed=2))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=f"{name}: cannot decode"):
        load_rgb(name, tmp_path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_garbage_is_refused(tmp_path):
    (tmp_path / "junk.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    (tmp_path / "text.jpg").write_text("not an image")
    for name in ["junk.png", "text.jpg"]:
        with pytest.raises(DataError, match=f"{name}: cannot decode"):
            load_rgb(name, tmp_path)


def _declared_png(path, width: int, height: int):
    """A tiny valid PNG whose header then claims ``width`` x ``height`` (the IHDR CRC fixed to match)."""
    write_image(path, np.zeros((1, 1), dtype=np.uint8))
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("side", [7_000, 10_000, 20_000])  # under PIL's warning limit, between, above its error
def test_decompression_bombs_are_refused_before_decoding(tmp_path, side):
    _declared_png(tmp_path / "bomb.png", side, side)
    with pytest.raises(DataError, match="bomb.png: .*decompression bomb"):
        load_rgb("bomb.png", tmp_path)


def test_the_pixel_limit_is_a_parameter(tmp_path):
    write_image(tmp_path / "a.png", pattern(20, 20, seed=0))
    assert load_rgb("a.png", tmp_path, max_pixels=400).shape == (3, 20, 20)
    with pytest.raises(DataError, match="exceeds the limit of 399"):
        load_rgb("a.png", tmp_path, max_pixels=399)


# --- letterbox ------------------------------------------------------------------------------------------------


def test_letterbox_hand_cases():
    # 100 wide x 50 high into 64: scale 0.64, resized 64 x 32, 16 rows of padding above
    box = Letterbox.fit((50, 100), 64)
    assert (box.scale, box.pad_x, box.pad_y) == (pytest.approx(0.64), 0, 16)
    assert box.inner_size((50, 100)) == (32, 64)
    # 30 high x 100 wide: 19.2 -> 19 rows, 45 rows of padding split 22 above / 23 below
    box = Letterbox.fit((30, 100), 64)
    assert (box.pad_x, box.pad_y, box.inner_size((30, 100))) == (0, 22, (19, 64))
    # tall: 80 high x 20 wide into 32: scale 0.4, 8 columns, 12 left of padding
    box = Letterbox.fit((80, 20), 32)
    assert (box.scale, box.pad_x, box.pad_y) == (pytest.approx(0.4), 12, 0)


def test_letterbox_boxes_hand_case_and_round_trip():
    box = Letterbox.fit((50, 100), 64)
    boxes = torch.tensor([[10.0, 20.0, 50.0, 40.0], [0.0, 0.0, 100.0, 50.0]])
    model = box.boxes_to_model(boxes)
    assert torch.allclose(model, torch.tensor([[6.4, 28.8, 32.0, 41.6], [0.0, 16.0, 64.0, 48.0]]))
    assert torch.allclose(box.boxes_to_original(model, (50, 100)), boxes, atol=1e-5)


def test_letterbox_boxes_back_are_clipped_to_the_image():
    box = Letterbox.fit((50, 100), 64)
    in_padding = torch.tensor([[-5.0, 2.0, 70.0, 60.0]])  # reaches into the padding and past the canvas
    assert torch.allclose(box.boxes_to_original(in_padding, (50, 100)), torch.tensor([[0.0, 0.0, 100.0, 50.0]]))


def test_letterbox_image_pads_with_114_around_the_resized_image():
    image = torch.from_numpy(pattern(50, 100, seed=3)).permute(2, 0, 1).contiguous()
    canvas, box = letterbox_image(image, 64)
    assert canvas.shape == (3, 64, 64) and canvas.dtype == torch.uint8
    assert (canvas[:, :16] == 114).all() and (canvas[:, 48:] == 114).all()
    assert torch.equal(canvas[:, 16:48], F.resize(image, [32, 64], antialias=True))


def test_letterbox_mask_is_nearest_with_255_padding_and_maps_back_exactly():
    labels = torch.from_numpy(np.kron(np.random.default_rng(0).integers(0, 5, (16, 8)), np.ones((4, 4)))).to(
        torch.uint8)  # 64 high x 32 wide, constant 4x4 blocks
    box = Letterbox.fit((64, 32), 32)  # halves: every block keeps 2x2 pixels of its own label
    mask = box.apply(tv_tensors.Mask(labels[None]), 32)[0]
    assert (mask[:, :8] == 255).all() and (mask[:, 24:] == 255).all()
    assert set(mask[:, 8:24].unique().tolist()) <= set(labels.unique().tolist())
    inner = mask[:, 8:24]  # padding cropped by hand: 32 x 16, each label a 2 x 2 block
    assert torch.equal(inner.repeat_interleave(2, 0).repeat_interleave(2, 1), labels)


def test_logits_map_back_to_the_original_size():
    box = Letterbox.fit((64, 32), 32)
    labels = torch.from_numpy(np.kron(np.random.default_rng(1).integers(0, 3, (16, 8)), np.ones((4, 4)))).long()
    logits = torch.nn.functional.one_hot(labels, 3).permute(2, 0, 1).float() * 10
    model_logits = box.apply(tv_tensors.Image(logits), 32)
    back = box.logits_to_original(model_logits, (64, 32))
    assert back.shape == (3, 64, 32)
    # bilinear smooths block borders; away from them the argmax is the original label
    interior = torch.from_numpy(np.kron(np.ones((16, 8)), np.pad(np.ones((2, 2)), 1))).bool()
    assert torch.equal(back.argmax(0)[interior], labels[interior])


def test_letterbox_tensor_round_trip():
    box = Letterbox.fit((30, 100), 64)
    assert Letterbox.from_tensor(box.as_tensor()) == Letterbox(pytest.approx(box.scale), box.pad_x, box.pad_y)


# --- the shared cache -----------------------------------------------------------------------------------------


class _Numbers(CachedImageDataset):
    """Sample i is an 8x8 image of value i; the ones in ``bad`` raise DataError."""

    def __init__(self, n, bad=(), **kwargs):
        def load(i):
            if i in bad:
                raise DataError(f"file{i}.png: broken")
            box = Letterbox(1.0, 0, 0)
            return torch.full((3, 8, 8), i, dtype=torch.uint8), i, SampleMeta(f"file{i}.png", (8, 8), None, box)

        super().__init__("numbers", list(range(n)), load, **kwargs)


def test_cache_serves_floats_and_skips_bad_samples_with_one_warning():
    with pytest.warns(UserWarning, match=r"numbers: skipped 2 bad sample\(s\): file1.png: broken; file3.png") as seen:
        data = _Numbers(5, bad=(1, 3), on_bad_sample="skip")
    assert len(seen) == 1
    assert [data[i][1] for i in range(len(data))] == [0, 2, 4]
    image, _ = data[1]
    assert image.dtype == torch.float32 and image.max() == pytest.approx(2 / 255)
    with pytest.raises(DataError, match="file1.png: broken"):
        _Numbers(5, bad=(1,))
    with pytest.raises(DataError, match="no usable sample"), pytest.warns(UserWarning):
        _Numbers(2, bad=(0, 1), on_bad_sample="skip")
    with pytest.raises(ValueError, match="on_bad_sample"):
        _Numbers(2, on_bad_sample="ignore")


def test_subset_is_seeded_sorted_and_refills_skipped_samples():
    first = [t for t in _Numbers(20, subset=5, seed=1).targets]
    assert first == sorted(first) and len(set(first)) == 5
    assert _Numbers(20, subset=5, seed=1).targets == first
    assert _Numbers(20, subset=5, seed=2).targets != first
    with pytest.warns(UserWarning, match="skipped 1"):
        refilled = _Numbers(20, bad=(first[0],), subset=5, seed=1, on_bad_sample="skip").targets
    assert len(refilled) == 5 and set(first) - set(refilled) == {first[0]}
    with pytest.raises(DataError, match="subset of 21 requested, but the split has 20"):
        _Numbers(20, subset=21)
    with pytest.raises(DataError, match="no sample"):
        _Numbers(0)
