"""Class-folder classification loader on an Imagenette-style tree written by the test."""
import shutil

import pytest
import torch
from realdata import write_folder

from clmtl.data.folder import ImageFolderDataset
from clmtl.errors import DataError
from clmtl.stream.tasks import CLASSIFICATION


def test_classes_labels_and_ignored_files(tmp_path):
    written = write_folder(tmp_path)
    for split in ("train", "val"):
        data = ImageFolderDataset(tmp_path, split, 32)
        assert data.kind == CLASSIFICATION
        assert data.folders == ("my_class", "n01440764", "n03888605")  # sorted by folder name
        assert data.classes == ("my_class", "tench", "parachute")  # Imagenette wnids read as names
        expected = sorted((path.resolve(), data.folders.index(folder)) for path, folder in written.files[split])
        assert [(data.meta(i).file, data[i][1]) for i in range(len(data))] == expected  # notes/README ignored
        image, label = data[0]
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and isinstance(label, int)
    assert any(path.suffix == ".JPEG" for path, _ in written.files["train"])  # upper-case extension accepted


def test_train_and_val_must_have_the_same_class_folders(tmp_path):
    write_folder(tmp_path)
    shutil.rmtree(tmp_path / "val" / "n01440764")
    (tmp_path / "val" / "extra").mkdir()
    for split in ("train", "val"):
        with pytest.raises(DataError, match=r"different class folders \(only in train: \['n01440764'\]; only in "
                                            r"val: \['extra'\]\)|\(only in val: \['extra'\]; only in train: "
                                            r"\['n01440764'\]\)"):
            ImageFolderDataset(tmp_path, split, 32)


def test_hidden_folders_are_not_classes(tmp_path):
    write_folder(tmp_path)
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()
    assert len(ImageFolderDataset(tmp_path, "train", 32).classes) == 3


def test_empty_or_missing_split(tmp_path):
    write_folder(tmp_path, counts={"train": 1, "val": 0})
    with pytest.raises(DataError, match="val.*no sample"):
        ImageFolderDataset(tmp_path, "val", 32)
    with pytest.raises(DataError, match="test: split folder not found"):
        ImageFolderDataset(tmp_path, "test", 32)
    (tmp_path / "lonely" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="no class folder"):
        ImageFolderDataset(tmp_path / "lonely", "train", 32)


def test_bad_image_raises_or_is_skipped(tmp_path):
    written = write_folder(tmp_path)
    broken, _ = written.files["train"][1]
    broken.write_bytes(broken.read_bytes()[:40])
    with pytest.raises(DataError, match=f"{broken.name}: cannot decode"):
        ImageFolderDataset(tmp_path, "train", 32)
    with pytest.warns(UserWarning, match=f"skipped 1 bad sample.*{broken.name}") as seen:
        data = ImageFolderDataset(tmp_path, "train", 32, on_bad_sample="skip")
    assert len(seen) == 1 and len(data) == len(written.files["train"]) - 1


def test_subset_is_seeded(tmp_path):
    write_folder(tmp_path)
    files = [ImageFolderDataset(tmp_path, "train", 32, subset=4, seed=seed) for seed in (0, 0, 1)]
    names = [[data.meta(i).file for i in range(len(data))] for data in files]
    assert len(names[0]) == 4 and names[0] == names[1] and names[0] != names[2] and names[0] == sorted(names[0])
