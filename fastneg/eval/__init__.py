"""Evaluation of frozen backbones: linear probe, kNN, ImageNet-C style corruptions, shape bias.

    from fastneg.eval import shape_bias, evaluate_checkpoint
    shape_bias(predictions, shape=labels, texture=texture_classes)   # Geirhos et al. 2019
    evaluate_checkpoint("runs/moco/last.pt", "data/shapes")          # what `fastneg eval` prints
    evaluate_checkpoint(ckpt, "imagenet100", ood_root="ood")        # + the paper's OOD table
"""
from fastneg.eval.knn import knn_predict, knn_predict_chunked
from fastneg.eval.linear import LinearProbe, fit_linear_probe, train_linear_probe
from fastneg.eval.metrics import shape_bias, top1
from fastneg.eval.suite import evaluate_backbone, evaluate_checkpoint

__all__ = ["shape_bias", "top1", "knn_predict", "knn_predict_chunked", "LinearProbe",
           "fit_linear_probe", "train_linear_probe", "evaluate_backbone", "evaluate_checkpoint"]
