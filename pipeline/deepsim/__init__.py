"""deepsim: learned medical image registration with semantic (DeepSim) similarity metrics."""

__version__ = "0.1.0"
