"""lightning-ft: fine-tuning methods for transformers as composable PyTorch Lightning callbacks and mixins."""

__version__ = "0.1.0"
