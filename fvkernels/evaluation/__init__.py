"""Evaluation (paper §5): the set encoders FV-VAE is compared with and FV-VAE as one of them (encoders), the
clustering they fit (clustering), the classification protocol (features, classifier, metrics) and where a
Fisher vector comes from (attention)."""
from fvkernels.evaluation.attention import descriptor_contributions
from fvkernels.evaluation.classifier import LinearSVM, train_svm
from fvkernels.evaluation.compression import DatasetNormalization, PCACompression, RandomMaclaurin
from fvkernels.evaluation.encoders import (
                                           AverageEncoder,
                                           BilinearEncoder,
                                           ConcatEncoder,
                                           FVVAEEncoder,
                                           GMMFisherEncoder,
                                           SetEncoder,
                                           VLADEncoder,
)
from fvkernels.evaluation.features import normalize
from fvkernels.evaluation.metrics import accuracy, mean_average_precision, top_k_accuracy

__all__ = ["AverageEncoder", "BilinearEncoder", "ConcatEncoder", "DatasetNormalization", "FVVAEEncoder",
           "GMMFisherEncoder", "LinearSVM", "PCACompression", "RandomMaclaurin", "SetEncoder", "VLADEncoder", "accuracy", "descriptor_contributions", "mean_average_precision", "normalize",
           "top_k_accuracy", "train_svm"]
