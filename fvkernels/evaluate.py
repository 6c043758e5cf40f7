"""Kept for earlier import paths (README, DESIGN §2): the classification protocol lives in fvkernels.evaluation."""
from fvkernels.evaluation.classifier import LinearSVM, squared_hinge_newton, train_svm
from fvkernels.evaluation.features import normalize
from fvkernels.evaluation.metrics import accuracy, mean_average_precision, top_k_accuracy

__all__ = ["LinearSVM", "accuracy", "mean_average_precision", "normalize", "squared_hinge_newton", "top_k_accuracy",
           "train_svm"]
