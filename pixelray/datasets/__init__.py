"""Converters into pixelray shards: ImageNet, any class-per-folder image tree, and synthetic data."""

from pixelray.datasets.folder import ConvertResult, Skipped, Transform, convert_folder, load_image
from pixelray.datasets.imagenet import convert_imagenet
from pixelray.datasets.synthetic import make_synthetic

__all__ = ["ConvertResult", "Skipped", "Transform", "convert_folder", "convert_imagenet", "load_image",
           "make_synthetic"]
