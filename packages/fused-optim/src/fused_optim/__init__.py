"""The fused-optim command line: ``fused-optim train`` and ``fused-optim bench``."""

__version__ = "0.1.0"
