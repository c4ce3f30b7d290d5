"""Image grids as PNG files (matplotlib, the ``plot`` extra) and arrays as .npy files, both
written atomically (a complete file or none)."""

from __future__ import annotations

import io as _io

import numpy as np

from ._atomic import atomic_write

__all__ = ["require_matplotlib", "mosaic", "save_image_grid", "save_npy"]

PLOT_EXTRA_HINT = "pip install 'fastdrmm[plot]'"


def require_matplotlib():
    """Import matplotlib or raise an ImportError (one line) naming the ``plot`` extra."""
    try:
        import matplotlib  # noqa: F401
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError:
        raise ImportError(f"writing a PNG needs matplotlib, which is not installed: "
                          f"{PLOT_EXTRA_HINT}") from None


def _as_picture(image):
    """(C, H, W) -> (H, W) grey or (H, W, 3) colour, scaled to [0, 1] by its own range; an
    all-NaN image is a blank (white) cell."""
    image = np.asarray(image, np.float64)
    picture = image.transpose(1, 2, 0) if image.shape[0] == 3 else image.mean(axis=0)
    if np.isnan(picture).all():
        return np.ones_like(picture)
    low, high = float(picture.min()), float(picture.max())
    if high > low:
        return (picture - low) / (high - low)
    return np.zeros_like(picture)


def mosaic(rows, gap=1):
    """One array from rows of images: ``rows`` is (R, K, C, H, W); each image is scaled to
    [0, 1] by its own range (an all-NaN image stays blank) and the cells are separated by
    ``gap`` pixels of 1 (white)."""
    rows = np.asarray(rows)
    if rows.ndim != 5:
        raise ValueError(f"rows must be (R, K, C, H, W), got shape {rows.shape}")
    n_rows, n_cols, channels, h, w = rows.shape
    colour = channels == 3
    shape = (n_rows * (h + gap) - gap, n_cols * (w + gap) - gap) + ((3,) if colour else ())
    out = np.ones(shape)
    for r in range(n_rows):
        for k in range(n_cols):
            out[r * (h + gap):r * (h + gap) + h, k * (w + gap):k * (w + gap) + w] = \
                _as_picture(rows[r, k])
    return out


def save_image_grid(path, rows, row_labels=None, title=None, cell_inches=0.45):
    """Write ``rows`` (R, K, C, H, W) as one PNG grid (R rows of K images) to ``path``.

    Every image is shown grey (colour when C == 3) by its own range. ``row_labels`` names
    the rows. Raises ImportError (naming the extra) without matplotlib.
    """
    require_matplotlib()
    # a Figure on its own Agg canvas, not pyplot: the user's global backend stays as it was
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = np.asarray(rows)
    picture = mosaic(rows)
    n_rows, n_cols, _, h, w = rows.shape
    fig = Figure(figsize=(max(2.0, cell_inches * n_cols + 1.0),
                          max(1.5, cell_inches * n_rows * h / w + (0.6 if title else 0.2))))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.imshow(picture, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xticks([])
    if row_labels is not None:
        ax.set_yticks([r * (h + 1) + (h - 1) / 2 for r in range(n_rows)])
        ax.set_yticklabels([str(label) for label in row_labels])
        ax.tick_params(axis="y", length=0)
    else:
        ax.set_yticks([])
    for side in ax.spines.values():
        side.set_visible(False)
    if title:
        ax.set_title(title, fontsize=9)
    buffer = _io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    with atomic_write(path) as (f, _):
        f.write(buffer.getvalue())
    return path


def save_npy(path, array):
    """Write ``array`` to ``path`` in NumPy's .npy format, atomically (no pickle)."""
    with atomic_write(path) as (f, _):
        np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
    return path
