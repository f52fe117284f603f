"""Class-folder classification (the Imagenette layout ``root/{train,val}/<class folder>/<image>``).

Classes are the class folders sorted by name; Imagenette's WordNet ids get readable names. Files are images by
extension (case-insensitive), anything else is ignored; hidden folders are not classes. Train and val must have
the same class folders, or labels would mean different classes in the two splits.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from torchvision.transforms.v2.functional import rgb_to_grayscale

from clmtl.data.images import CachedImageDataset, Loaded, check_class_names, is_image_file, load_letterboxed
from clmtl.errors import DataError
from clmtl.stream.tasks import CLASSIFICATION

SPLITS = ("train", "val")
IMAGENETTE_NAMES = {
    "n01440764": "tench", "n02102040": "English springer", "n02979186": "cassette player",
    "n03000684": "chain saw", "n03028079": "church", "n03394916": "French horn", "n03417042": "garbage truck",
    "n03425413": "gas pump", "n03445777": "golf ball", "n03888605": "parachute",
}


class ImageFolderDataset(CachedImageDataset):
    """Classification samples of one split; target the class index. ``folders[label]`` is the class's folder.

    ``classes`` keeps only those classes, in that label order, each named by its folder or its readable name.
    ``channels`` 1 makes the images grey.
    """

    kind = CLASSIFICATION

    def __init__(self, root: str | Path, split: str, image_size: int, on_bad_sample: str = "error",
                 subset: int | None = None, seed: int = 0, classes: Sequence[str] | None = None,
                 channels: int = 3) -> None:
        self.root = Path(root)
        self.image_size = image_size
        self.channels = channels
        self.folders = _class_folders(self.root, split)
        if classes is not None:
            self.folders = _pick(self.folders, classes, self.root / split)
        self.classes = tuple(IMAGENETTE_NAMES.get(folder, folder) for folder in self.folders)
        samples = [
            (f"{split}/{folder}/{file.name}", label)
            for label, folder in enumerate(self.folders)
            for file in sorted((self.root / split / folder).iterdir())
            if file.is_file() and is_image_file(file)
        ]
        super().__init__(f"{self.root / split}", samples, self._load, on_bad_sample, subset, seed)

    def _load(self, sample: tuple[str, int]) -> Loaded:
        path, label = sample
        image, meta = load_letterboxed(path, self.root, self.image_size)
        return (rgb_to_grayscale(image) if self.channels == 1 else image), label, meta


def class_names(root: Path, split: str) -> tuple[str, ...]:
    """Every class of a split, in label order, as readable names (what a split deals into tasks)."""
    return tuple(IMAGENETTE_NAMES.get(folder, folder) for folder in _class_folders(root, split))


def _pick(folders: Sequence[str], classes: Sequence[str], where: Path) -> tuple[str, ...]:
    """The folders of the named classes, in the order named (a class is named by its folder or readable name)."""
    by_name = {**{IMAGENETTE_NAMES.get(folder, folder): folder for folder in folders},
               **{folder: folder for folder in folders}}
    check_class_names(classes, list(by_name), str(where))
    return tuple(by_name[name] for name in classes)


def _class_folders(root: Path, split: str) -> tuple[str, ...]:
    """The split's class folders, sorted; checked against the other splits present."""
    def folders(name: str) -> tuple[str, ...]:
        return tuple(sorted(d.name for d in (root / name).iterdir() if d.is_dir() and not d.name.startswith(".")))

    if not (root / split).is_dir():
        raise DataError(f"{root / split}: split folder not found")
    mine = folders(split)
    if not mine:
        raise DataError(f"{root / split}: no class folder")
    for other in SPLITS:
        if other == split or not (root / other).is_dir():
            continue
        theirs = folders(other)
        if theirs != mine:
            only_here, only_there = sorted(set(mine) - set(theirs)), sorted(set(theirs) - set(mine))
            raise DataError(f"{root}: splits {split!r} and {other!r} have different class folders "
                            f"(only in {split}: {only_here}; only in {other}: {only_there})")
    return mine
