"""ofa_ds: OFA rebuilt as a DeepSpeed training system. See README.md."""
__version__ = "0.1.0"
