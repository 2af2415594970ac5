"""Training and evaluation data: the named datasets (`datasets.py`), in-memory and folder images with the
pixel range and flips (`images.py`), and the resumable batch stream that feeds training (`stream.py`)."""

from .datasets import (CIFAR, CIFAR10_CLASSES, DIGITS_SIZE, CifarSpec, digits_split_indices, load_dataset,
                       read_pickle_restricted)
from .images import (FolderImages, ImageDataset, InMemoryImages, apply_hflip, default_root, from_model_range,
                     hflip_mask, random_hflip, to_model_range)
from .stream import BatchStream, _CatchErrors, _collate, _Failure

__all__ = ["CIFAR", "CIFAR10_CLASSES", "DIGITS_SIZE", "BatchStream", "CifarSpec", "FolderImages", "ImageDataset",
           "InMemoryImages", "apply_hflip", "default_root", "digits_split_indices", "from_model_range", "hflip_mask",
           "load_dataset", "random_hflip", "read_pickle_restricted", "to_model_range", "_CatchErrors", "_collate",
           "_Failure"]
