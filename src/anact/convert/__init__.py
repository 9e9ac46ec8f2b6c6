"""Model surgery: conversion (:func:`convert`), inference folding (:func:`fold`) and
synchronised statistics for DDP (:func:`convert_sync`).

Import the public names from :mod:`anact` (``anact.convert`` is the function).
"""

from anact.convert.conversion import (
    DEFAULT_SOURCE,
    ConversionError,
    ConversionReport,
    FeatureBatchNorm,
    SiteRecord,
    convert,
)
from anact.convert.fold import FoldedActivation, fold
from anact.convert.sync import SyncNormalizedActivation, convert_sync, gather_moments

__all__ = [
    "DEFAULT_SOURCE",
    "ConversionError",
    "ConversionReport",
    "FeatureBatchNorm",
    "FoldedActivation",
    "SiteRecord",
    "SyncNormalizedActivation",
    "convert",
    "convert_sync",
    "fold",
    "gather_moments",
]
