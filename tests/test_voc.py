"""VOC segmentation loader on both layouts and all mask encodings written by the test, and its errors."""
import numpy as np
import pytest
import torch
from PIL import Image
from realdata import VOC_PALETTE, VOC_VOID, write_image, write_mask, write_voc

from clmtl.data.voc import VOC_CLASSES, VocSegmentation, read_label_map, voc_colormap
from clmtl.errors import DataError
from clmtl.stream.tasks import SEGMENTATION


def test_colormap_is_the_voc_palette():
    assert voc_colormap(21).tolist() == [list(colour) for colour in VOC_PALETTE]
    assert tuple(voc_colormap()[255]) == VOC_VOID
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[0] == "background" and VOC_CLASSES[15] == "person"


def _expected_mask(labels: np.ndarray, size: int) -> torch.Tensor:
    """The written label map letterboxed by hand, without the loader's geometry: the long side scaled to ``size``
    (aspect kept, the short side rounded), nearest-neighbour resize, the rest padded with 255 evenly (the odd row
    or column at the bottom / right).

    Nearest is torch's ``interpolate(mode="nearest")`` rule, which torchvision resizes masks with: output pixel ``i``
    takes input pixel ``floor(i * in / out)``, the ratio in float32.
    """
    h, w = labels.shape
    inner_h, inner_w = round(h * size / max(h, w)), round(w * size / max(h, w))
    rows = np.minimum(np.floor(np.arange(inner_h, dtype=np.float32) * np.float32(h / inner_h)).astype(int), h - 1)
    cols = np.minimum(np.floor(np.arange(inner_w, dtype=np.float32) * np.float32(w / inner_w)).astype(int), w - 1)
    expected = np.full((size, size), 255, dtype=np.int64)
    top, left = (size - inner_h) // 2, (size - inner_w) // 2
    expected[top:top + inner_h, left:left + inner_w] = labels[rows[:, None], cols[None, :]]
    return torch.from_numpy(expected)


@pytest.mark.parametrize("layout", ["voc", "folders"])
@pytest.mark.parametrize("mask_format", ["palette", "rgb", "grey"])
def test_masks_of_every_encoding_and_layout(tmp_path, layout, mask_format):
    written = write_voc(tmp_path, layout=layout, mask_format=mask_format)
    for split in ("train", "val"):
        data = VocSegmentation(tmp_path, split, 32)
        assert data.kind == SEGMENTATION and data.classes == VOC_CLASSES
        samples = sorted(written.splits[split], key=lambda s: s.id)
        assert len(data) == len(samples)
        for i, sample in enumerate(samples):
            image, target = data[i]
            assert image.shape == (3, 32, 32) and target.dtype == torch.long and target.shape == (32, 32)
            assert torch.equal(target, _expected_mask(sample.labels, 32))
            assert data.meta(i).file == sample.image_file.resolve()
            assert data.meta(i).original_size == sample.labels.shape


@pytest.mark.parametrize("size", [45, 70])  # odd padding, and upscaling (every source pixel repeated)
def test_masks_at_other_sizes(tmp_path, size):
    written = write_voc(tmp_path, layout="folders")
    data = VocSegmentation(tmp_path, "train", size)
    for i, sample in enumerate(sorted(written.splits["train"], key=lambda s: s.id)):
        target = data[i][1]
        assert target.shape == (size, size)
        assert torch.equal(target, _expected_mask(sample.labels, size))


def test_target_hand_checked(tmp_path):
    # 56 wide x 40 high into 56: scale 1, 8 rows of 255 above and below
    written = write_voc(tmp_path, layout="folders", samples={"train": [("a", (40, 56))]})
    image, target = VocSegmentation(tmp_path, "train", 56)[0]
    assert (target[:8] == 255).all() and (target[48:] == 255).all()
    assert np.array_equal(target[8:48].numpy(), written.splits["train"][0].labels)
    assert {0, 255} < set(target.unique().tolist())  # background, void outlines and two classes
    assert torch.equal(image[:, 8:48], torch.from_numpy(written.splits["train"][0].pixels).permute(2, 0, 1) / 255)
    # into 28: scale 0.5, nearest keeps every other pixel, 4 rows of padding above
    target = VocSegmentation(tmp_path, "train", 28)[0][1]
    assert (target[:4] == 255).all() and (target[24:] == 255).all()
    assert np.array_equal(target[4:24].numpy(), written.splits["train"][0].labels[::2, ::2])


def test_unknown_colour_is_named(tmp_path):
    written = write_voc(tmp_path, layout="folders", samples={"train": [("a", (20, 30))]}, mask_format="rgb")
    mask = np.asarray(Image.open(written.splits["train"][0].mask_file)).copy()
    mask[3, 4] = (1, 2, 3)
    Image.fromarray(mask).save(written.splits["train"][0].mask_file)
    with pytest.raises(DataError, match=r"a.png: colour \(1, 2, 3\) is neither"):
        VocSegmentation(tmp_path, "train", 32)


def test_value_outside_the_classes_is_refused(tmp_path):
    written = write_voc(tmp_path, layout="folders", samples={"train": [("a", (20, 30))]})
    labels = written.splits["train"][0].labels.copy()
    labels[0, 0] = 21
    write_mask(written.splits["train"][0].mask_file, labels)
    with pytest.raises(DataError, match=r"a.png: mask values \[21\] are neither a class \(0..20\) nor void"):
        VocSegmentation(tmp_path, "train", 32)
    data = VocSegmentation(tmp_path, "train", 32, classes=VOC_CLASSES + ("extra",))  # 22 classes: 21 is valid
    assert 21 in data[0][1].unique().tolist()


@pytest.mark.parametrize("mode, format", [
    ("CMYK", "TIFF"),  # PNG cannot hold CMYK; PIL reads a mask by its content, whatever its name
    ("F", "TIFF"),  # float labels: 1.5 is no class
    ("I;16", "PNG"),  # 16-bit grey: values above 255 would wrap in uint8
])
def test_unsupported_mask_mode_is_one_line_naming_the_file(tmp_path, mode, format):
    written = write_voc(tmp_path, layout="folders", samples={"train": [("a", (20, 30))]})
    mask_file = written.splits["train"][0].mask_file
    Image.new(mode, (30, 20)).save(mask_file, format=format)  # still named a.png
    assert Image.open(mask_file).mode == mode
    with pytest.raises(DataError) as info:
        read_label_map("train/SegmentationClass/a.png", tmp_path, 21)
    assert str(info.value) == (f"{mask_file}: mask mode {mode!r}; expected a palette, greyscale or RGB PNG")
    with pytest.raises(DataError, match=rf"a\.png: mask mode '{mode}'; expected") as info:
        VocSegmentation(tmp_path, "train", 32)
    assert "\n" not in str(info.value)


def test_mask_size_must_match_its_image(tmp_path):
    written = write_voc(tmp_path, layout="folders", samples={"train": [("a", (20, 30)), ("b", (24, 24))]})
    write_mask(written.splits["train"][0].mask_file, np.zeros((20, 31), dtype=np.uint8))
    with pytest.raises(DataError, match=r"a.png: mask is 31x20 but its image a.png is 30x20"):
        VocSegmentation(tmp_path, "train", 32)
    with pytest.warns(UserWarning, match=r"skipped 1 bad sample"):
        assert len(VocSegmentation(tmp_path, "train", 32, on_bad_sample="skip")) == 1


def test_missing_mask_or_image(tmp_path):
    written = write_voc(tmp_path, layout="voc")
    written.splits["val"][0].mask_file.unlink()
    with pytest.raises(DataError, match="SegmentationClass/2009_000001.png: file not found"):
        VocSegmentation(tmp_path, "val", 32)
    written.splits["train"][1].image_file.unlink()
    with pytest.raises(DataError, match="JPEGImages/2007_000039.jpg: file not found"):
        VocSegmentation(tmp_path, "train", 32)


def test_split_entries_may_not_leave_the_root(tmp_path):
    write_voc(tmp_path / "voc", layout="voc")
    write_image(tmp_path / "x.jpg", np.zeros((4, 4, 3), dtype=np.uint8))
    (tmp_path / "voc" / "ImageSets" / "Segmentation" / "train.txt").write_text("2007_000032\n../../x\n")
    with pytest.raises(DataError, match="x.jpg: path leads outside the dataset root"):
        VocSegmentation(tmp_path / "voc", "train", 32)


def test_empty_split_and_missing_layout(tmp_path):
    write_voc(tmp_path, layout="voc")
    (tmp_path / "ImageSets" / "Segmentation" / "val.txt").write_text("\n")
    with pytest.raises(DataError, match="split 'val'.*no sample"):
        VocSegmentation(tmp_path, "val", 32)
    with pytest.raises(DataError, match="no VOC layout for split 'test'"):
        VocSegmentation(tmp_path, "test", 32)


def test_subset_is_seeded(tmp_path):
    write_voc(tmp_path, layout="folders")
    first = VocSegmentation(tmp_path, "train", 32, subset=2, seed=5)
    again = VocSegmentation(tmp_path, "train", 32, subset=2, seed=5)
    assert len(first) == 2 and [m.file for m in map(first.meta, range(2))] == [again.meta(i).file for i in range(2)]
