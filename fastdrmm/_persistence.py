"""``fastdrmm.load``: read any model or checkpoint written by this library."""

from __future__ import annotations

from . import io

__all__ = ["load"]


# what building a model from a damaged but well-formed file can raise besides ValueError and
# TypeError (a missing key, a list where a dict belongs, an infinite count)
_CONTENT_ERRORS = (KeyError, IndexError, AttributeError, OverflowError, ZeroDivisionError,
                   RecursionError)


def load(path):
    """Load a model saved with ``save`` (or a DRMM training checkpoint) from ``path``.

    The file is fully checked first (a regular file; format, version, sizes, every array's
    shape, dtype and sha256; see :mod:`fastdrmm.io`), so a corrupted or truncated file raises
    ValueError naming it, as does one whose contents do not make a model.
    The model runs on any of its backends (its ``backend`` parameter can be changed after
    loading; both models compute on the host backends).
    A checkpoint loads as a model holding the checkpoint's best (else latest) parameters.
    """
    arrays, meta = io.load_arrays(path)
    try:
        return _build(path, arrays, meta)
    except _CONTENT_ERRORS as exc:
        raise ValueError(f"{path}: not a valid fastdrmm model file: its contents do not make a "
                         f"model ({type(exc).__name__}: {str(exc)[:200]})") from exc


def _build(path, arrays, meta):
    from ._checkpoint import load_checkpoint
    from ._drmm_format import load_saved
    from .drmm import DRMM
    from .rmm import RMM

    kind = meta.get("model_class")
    if kind == "DRMM":
        if "checkpoint" in meta:
            return load_checkpoint(DRMM, arrays, meta, path)
        return load_saved(DRMM, arrays, meta, path)
    if kind == "RMM":
        return RMM._from_saved(arrays, meta, path)
    raise ValueError(f"{path}: holds no fastdrmm model (model_class {kind!r:.100})")
