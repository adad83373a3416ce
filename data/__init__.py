"""Datasets of uint8 token sequences (ImageNet 64x64 npz, image folders, audio folders) and batch iterators."""

from .audio_folder import AudioFolder
from .image_folder import ImageFolder
from .imagenet64 import ImageNet64, write_imagenet64_npz
from .loader import Batches, EvalBatches, TokenDataset, eval_batches, open_dataset

__all__ = ["AudioFolder", "Batches", "EvalBatches", "ImageFolder", "ImageNet64", "TokenDataset", "eval_batches",
           "open_dataset", "write_imagenet64_npz"]
