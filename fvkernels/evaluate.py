"""Kept for existing imports (README, DESIGN §2): the classification protocol lives in fvkernels.evaluation."""
from fvkernels.evaluation import LinearSVM, accuracy, mean_average_precision, normalize, top_k_accuracy, train_svm

__all__ = ["LinearSVM", "accuracy", "mean_average_precision", "normalize", "top_k_accuracy", "train_svm"]
