"""``fastdrmm.load``: read any model or checkpoint written by this library."""

from __future__ import annotations

from . import io

__all__ = ["load"]


def load(path):
    """Load a model saved with ``save`` (or a DRMM training checkpoint) from ``path``.

    The file is fully checked first (format, version, every array's shape, dtype and sha256;
    see :mod:`fastdrmm.io`), so a corrupted or truncated file raises ValueError naming it.
    The model runs on any of its backends (its ``backend`` parameter can be changed after
    loading; both models compute on the host backends).
    A checkpoint loads as a model holding the checkpoint's best (else latest) parameters.
    """
    from .drmm import DRMM
    from .rmm import RMM

    arrays, meta = io.load_arrays(path)
    kind = meta.get("model_class")
    if kind == "DRMM":
        if "checkpoint" in meta:
            return DRMM._from_checkpoint(arrays, meta, path)
        return DRMM._from_saved(arrays, meta, path)
    if kind == "RMM":
        return RMM._from_saved(arrays, meta, path)
    raise ValueError(f"{path}: holds no fastdrmm model (model_class {kind!r})")
