"""Kept for earlier import paths (README, DESIGN §2): the set encoders live in fvkernels.evaluation."""
from fvkernels.evaluation.clustering import DiagonalGMM, fit_gmm, kmeans, kmeans_plusplus
from fvkernels.evaluation.encoders import (
                                           POSTERIOR_FLOOR,
                                           AverageEncoder,
                                           BilinearEncoder,
                                           ConcatEncoder,
                                           FVVAEEncoder,
                                           GMMFisherEncoder,
                                           SetEncoder,
                                           VLADEncoder,
)
from fvkernels.evaluation.sets import CHUNK_ELEMENTS, DEFAULT_FIT_DESCRIPTORS, DescriptorSets

__all__ = ["CHUNK_ELEMENTS", "DEFAULT_FIT_DESCRIPTORS", "POSTERIOR_FLOOR", "AverageEncoder", "BilinearEncoder",
           "ConcatEncoder", "DescriptorSets", "DiagonalGMM", "FVVAEEncoder", "GMMFisherEncoder", "SetEncoder",
           "VLADEncoder", "fit_gmm", "kmeans", "kmeans_plusplus"]
