"""Export to and import from the wider ecosystem: HF transformers folders, GGUF, model cards."""
