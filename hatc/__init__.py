"""hatc: Hardware-Aware Transformers as a toolchain."""

__version__ = "0.1.0"
