"""Bridges to other libraries (imported lazily: ``posenc.interop.hf`` needs transformers)."""
