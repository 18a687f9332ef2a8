"""Interop with models no one here wrote: Hugging Face transformers layouts and GGUF files."""
