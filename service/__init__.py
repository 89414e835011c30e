"""modelserve: a model server for scikit-learn and ONNX models."""

__version__ = "0.1.0"
