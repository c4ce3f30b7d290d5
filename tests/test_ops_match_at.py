"""match_at (the matching read at given positions): every backend x dtype against the
explicit-loop oracle ``naive.match_at``, the full-plane matching, the adjoint of render, and
the edge cases. The scenarios are match_at_checks', the ones every backend is held to."""

import numpy as np
import pytest

import match_at_checks as mac
import runners
from checks import DTYPES
from fastdrmm import ops
from scenarios import RENDER_GEOMETRIES, SWITCH_KINDS


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", RENDER_GEOMETRIES)
@pytest.mark.parametrize("switch_kind", SWITCH_KINDS)
def test_matches_naive_oracle(run, dtype, geom, switch_kind, rng):
    mac.check_geometry(run, rng, dtype, geom, switch_kind)


@pytest.mark.parametrize("dtype", DTYPES)
# rows of kw*C values: shorter than a vector, whole vectors, vectors plus a remainder
@pytest.mark.parametrize("c, kw", [(1, 5), (3, 2), (16, 2), (20, 3), (64, 3)])
def test_any_positions_and_row_lengths(run, dtype, c, kw, rng):
    mac.check_any_positions(run, rng, dtype, c, kw)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", RENDER_GEOMETRIES)
def test_is_the_full_matching_gathered(run, dtype, geom, rng):
    """What the top-down pass's code gradient used to compute: match on the whole plane with
    the identity switch and no bias, read at idx, times the switches."""
    mac.check_full_matching_gathered(run, rng, dtype, geom)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geom", RENDER_GEOMETRIES)
def test_is_the_adjoint_of_render(run, dtype, geom, rng):
    """<render(code), g> = <code, match_at(g)> for the same latents."""
    mac.check_adjoint_of_render(run, rng, dtype, geom)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("c, kw", [(1, 5), (20, 3)])
def test_nan_and_inf_stay_in_their_patches(run, dtype, c, kw, rng):
    """A NaN or inf poisons exactly the units whose patch holds it, and only where the switch
    is on; an off switch gives 0 without matching (no 0 * NaN)."""
    mac.check_nan_and_inf(run, rng, dtype, c, kw)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zeros_and_ties(run, dtype, rng):
    """Zero data and zero templates give exact zeros; a unit listed twice (a tie decided
    the same way twice) gets the same value twice."""
    mac.check_zeros_and_ties(run, rng, dtype)


@runners.only(runners.HOST_ARRAYS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(run, dtype, rng):
    """Strided x, idx and switches and a transposed view of the templates, as the backend
    receives them: equal to the contiguous call and to the oracle."""
    mac.check_non_contiguous(run, rng, dtype)


def test_empty_batch_and_dtype(run):
    got = run("match_at", np.zeros((0, 2, 6, 6), np.float32), np.ones((3, 2, 3, 3)),
              np.zeros((0, 3, 2, 2), np.int32))
    assert got.shape == (0, 3, 2, 2) and got.dtype == np.float32


def test_validation():
    x = np.zeros((2, 3, 6, 6))
    templates = np.zeros((4, 3, 3, 3))
    with pytest.raises(ValueError, match="idx must have shape"):
        ops.match_at(x, templates, np.zeros((2, 3, 2, 2), np.int32))
    with pytest.raises(ValueError, match="idx out of range"):
        ops.match_at(x, templates, np.full((2, 4, 2, 2), 16, np.int32))
    with pytest.raises(ValueError, match="idx must be a 4-d array"):
        ops.match_at(x, templates, np.zeros((2, 4, 2), np.int32))
    with pytest.raises(TypeError, match="idx must hold integers"):
        ops.match_at(x, templates, np.zeros((2, 4, 2, 2)))
    with pytest.raises(ValueError, match="switches must have shape"):
        ops.match_at(x, templates, np.zeros((2, 4, 2, 2), np.int32), switches=np.ones(3))
    with pytest.raises(ValueError, match="channels"):
        ops.match_at(x, np.zeros((4, 2, 3, 3)), np.zeros((2, 4, 2, 2), np.int32))
