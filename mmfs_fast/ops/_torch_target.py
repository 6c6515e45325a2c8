"""The oldest torch release the CUDA extension supports: setup.py compiles csrc/ against
LibTorch's stable ABI of this release (TORCH_TARGET_VERSION), so one build loads under it and
every later release; ops/_backend.py checks it before loading the extension. A plain data
file: setup.py reads it without importing the package."""
TORCH_TARGET = (2, 11)
