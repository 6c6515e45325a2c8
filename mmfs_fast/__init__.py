"""mmfs_fast: a fast PyTorch engine for MMFS (Multi-Modal Face Stylization with a Generative Prior)."""
__version__ = "0.1.0"

from mmfs_fast import ops  # noqa: E402
