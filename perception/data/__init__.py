"""Datasets (CamVid and user folders), augmentations and class weights."""

from perception.data.camvid import CAMVID_CLASSES, CAMVID_PALETTE, CAMVID_REFERENCE_WEIGHTS, CAMVID_VOID, CamVid
from perception.data.class_weights import class_frequencies, median_frequency_weights
from perception.data.folder import FolderDataset, SegmentationListDataset, read_image_rgb, read_label
from perception.data.loading import open_dataset
from perception.data.transforms import ToTensors, TrainAugment, normalize

__all__ = [
    "CAMVID_CLASSES",
    "CAMVID_PALETTE",
    "CAMVID_REFERENCE_WEIGHTS",
    "CAMVID_VOID",
    "CamVid",
    "FolderDataset",
    "SegmentationListDataset",
    "open_dataset",
    "read_image_rgb",
    "read_label",
    "class_frequencies",
    "median_frequency_weights",
    "TrainAugment",
    "ToTensors",
    "normalize",
]
