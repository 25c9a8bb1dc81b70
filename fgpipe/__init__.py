"""fgpipe: weakly supervised fine-grained classification pipeline."""
__version__ = "0.1.0"
