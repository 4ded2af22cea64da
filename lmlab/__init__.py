"""lmlab: language-model experiments on PyTorch Lightning, composed with Hydra, tracked in MLflow."""

__version__ = "0.1.0"
