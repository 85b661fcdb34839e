"""tuneforge: a reproducible, notebook-driven template for fine-tuning small LLMs."""

__version__ = "0.1.0"
