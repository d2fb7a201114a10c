"""Dragonfly: multi-resolution zoom-in encoding for vision-language models, in pure PyTorch.

This package never imports Ray, DeepSpeed, MLflow or s3fs: it is the model, the crop engine, the
token budget and the metrics, usable on its own.
"""

__version__ = "0.1.0"
