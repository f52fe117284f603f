"""VOC segmentation loader on both layouts and all mask encodings written by the test, and its errors."""
import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import tv_tensors

from clmtl.data.images import DataError
from clmtl.data.letterbox import Letterbox
from clmtl.data.voc import VOC_CLASSES, VocSegmentation, voc_colormap
from clmtl.tasks import SEGMENTATION
from realdata import VOC_PALETTE, VOC_VOID, write_image, write_mask, write_voc


def test_colormap_is_the_voc_palette():
    assert voc_colormap(21).tolist() == [list(colour) for colour in VOC_PALETTE]
    assert tuple(voc_colormap()[255]) == VOC_VOID
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[0] == "background" and VOC_CLASSES[15] == "person"


def _expected_mask(labels: np.ndarray, size: int) -> torch.Tensor:
    """The written label map letterboxed by hand: nearest resize, 255 padding (torchvision as the reference)."""
    box = Letterbox.fit(labels.shape, size)
    return box.apply(tv_tensors.Mask(torch.from_numpy(labels)[None]), size)[0].long()


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
