"""Kept for existing imports (README, DESIGN §2): the set encoders live in fvkernels.evaluation.encoders."""
from fvkernels.evaluation.clustering import DiagonalGMM, fit_gmm, kmeans
from fvkernels.evaluation.encoders import (
                                           AverageEncoder,
                                           BilinearEncoder,
                                           ConcatEncoder,
                                           FVVAEEncoder,
                                           GMMFisherEncoder,
                                           SetEncoder,
                                           VLADEncoder,
)

__all__ = ["AverageEncoder", "BilinearEncoder", "ConcatEncoder", "DiagonalGMM", "FVVAEEncoder", "GMMFisherEncoder",
           "SetEncoder", "VLADEncoder", "fit_gmm", "kmeans"]
