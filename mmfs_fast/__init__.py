"""mmfs_fast: a fast PyTorch engine for MMFS (Multi-Modal Face Stylization with a Generative Prior)."""
__version__ = "0.1.0"

from mmfs_fast import ops  # noqa: E402
from mmfs_fast.api import MMFS  # noqa: E402
from mmfs_fast.engine import Engine  # noqa: E402
from mmfs_fast.io import ImageError, load_image, save_image, to_pil  # noqa: E402
from mmfs_fast.models import CheckpointError, Stylizer, StylizerConfig  # noqa: E402

__all__ = ["MMFS", "Engine", "Stylizer", "StylizerConfig", "CheckpointError", "ImageError", "load_image",
           "save_image", "to_pil", "ops", "__version__"]
