"""The project's one error model: every failure of user input or of the environment
(unreadable, malformed, unsupported, unwritable, disk full) is an :class:`MMFSError` whose
message names the file and the fix.

A fix that is an option is written with :func:`option` and rendered twice: as the Python
keyword in ``str(error)`` (``allow_cast=True``) and as the command-line flag in
:meth:`MMFSError.cli_message` (``--allow-cast``), so each caller reads the name it can type.

Exit codes of the ``mmfs-fast`` command: :data:`EXIT_USAGE` (2) for bad options, unusable
weights and unwritable outputs (nothing more is written), :data:`EXIT_SOME_FAILED` (1) when
some inputs failed and the others were written (or no photo had a face).
"""
from __future__ import annotations

import errno
import re

EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2

# option name → (Python keyword, CLI flag)
OPTIONS = {
    "allow_cast": ("allow_cast=True", "--allow-cast"),
    "trust_torchscript": ("trust_torchscript=True", "--trust-torchscript"),
    "random_init": ("random_init=True", "--random-init"),
    "clip_weights": ("clip_weights=<ViT-B-32.pt>", "--clip-weights ViT-B-32.pt"),
    "dino_weights": ("dino_weights=<dino_vitbase8_pretrain.pth>", "--dino-weights dino_vitbase8_pretrain.pth"),
    "ckpt": ("ckpt=<checkpoint>", "--ckpt <checkpoint>"),
    "max_pixels": ("max_pixels=", "--max-pixels"),
    "seed": ("seed", "--seed"),
    "impl": ("impl=", "--impl"),
}
_MARK = "\x00"
_OPTION = re.compile(f"{_MARK}(\\w+){_MARK}")


def option(name: str) -> str:
    """A placeholder for option ``name`` inside a message; see the module docstring."""
    if name not in OPTIONS:
        raise KeyError(f"unknown option {name!r}: add it to mmfs_fast.errors.OPTIONS")
    return f"{_MARK}{name}{_MARK}"


def render(message: str, cli: bool) -> str:
    """``message`` with its option placeholders as CLI flags (``cli``) or Python keywords."""
    return _OPTION.sub(lambda m: OPTIONS[m[1]][1 if cli else 0], message)


class MMFSError(Exception):
    """A failure of an input or of the environment; the message names the file and the fix."""

    exit_code = EXIT_USAGE

    def __init__(self, message: str):
        super().__init__(message)
        self.template = message

    def __str__(self) -> str:
        return render(self.template, cli=False)

    def cli_message(self) -> str:
        return render(self.template, cli=True)


class UsageError(MMFSError, ValueError):
    """Bad options: nothing ran."""


class ImageError(MMFSError, ValueError):
    """An input that cannot be read as an image; the message names the input."""


class CheckpointError(MMFSError, ValueError):
    """A file or dict that is not the checkpoint it was loaded as, or whose weights are unusable."""


class EncoderWeightsError(MMFSError, ValueError):
    """Missing or unusable weights for a pretrained encoder (CLIP, DINO, …)."""


class WriteError(MMFSError, OSError):
    """An output that cannot be written (read-only folder, disk full, size limit); no partial
    file is left behind."""


_WRITE_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EFBIG: "the file size limit is exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only",
}


def write_error(path, error: OSError) -> WriteError:
    """The :class:`WriteError` of ``error`` raised while writing ``path``."""
    reason = _WRITE_REASONS.get(error.errno, error.strerror or str(error))
    return WriteError(f"{path}: cannot write it ({reason}); nothing was written there. Free some space or "
                      f"choose a writable output folder.")


def as_usage_error(error: Exception) -> MMFSError:
    """``error`` itself if it is one of ours (it keeps its two renderings), else a UsageError
    with its message."""
    return error if isinstance(error, MMFSError) else UsageError(str(error))


def one_line(error: BaseException, limit: int = 200) -> str:
    """``Type: first line`` of an error raised by a library, for a message of ours: some (torch's
    weights_only refusal) run to many lines of advice that does not apply to our callers."""
    text = str(error).strip()
    if text.startswith("Weights only load failed"):
        # the first line is torch's advice to load with weights_only=False, which we never do
        cause = [line.strip() for line in text.splitlines()[1:] if line.strip()
                 and not line.startswith(("Please file an issue", "Check the documentation"))]
        cause = cause[0] if cause else "unknown"
        if "global" in cause.lower():
            return (f"it holds Python objects other than tensors ({cause[:limit]}), refused: unpickling them "
                    "could run code")
        return f"not a pickle of tensors only ({cause[:limit]})"
    text = text.splitlines()[0] if text else ""
    text = text if len(text) <= limit else text[:limit] + " …"
    return f"{type(error).__name__}: {text}" if text else type(error).__name__
