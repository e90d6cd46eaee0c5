import numpy as np
import pytest
from PIL import Image

from patho_r1.fixtures.synth import TISSUES, render_tile
from patho_r1.stain import HEDJitter, StainNormalizer, estimate_stain_matrix, hed_jitter, stain_angle


@pytest.fixture
def tiles():
    target = render_tile(TISSUES[1], np.random.default_rng(0), 112, "light")
    source = render_tile(TISSUES[1], np.random.default_rng(5), 112, "dark")
    source = hed_jitter(source, sigma=0.3, bias=0.2, rng=np.random.default_rng(1))  # an off-protocol stain
    return target, source


def test_hed_jitter_keeps_shape_dtype_and_changes_colour(tiles):
    target, _ = tiles
    out = hed_jitter(target, rng=np.random.default_rng(0))
    assert out.shape == target.shape and out.dtype == np.uint8
    assert not np.array_equal(out, target)
    assert np.abs(out.astype(int) - target.astype(int)).mean() < 40  # augmentation, not destruction
    assert np.array_equal(hed_jitter(target, rng=np.random.default_rng(3)),
                          HEDJitter()(target, np.random.default_rng(3)))
    pil = hed_jitter(Image.fromarray(target), rng=np.random.default_rng(0))
    assert isinstance(pil, Image.Image) and pil.size == (112, 112)


def test_macenko_moves_the_stain_vectors_toward_the_target(tiles):
    target, source = tiles
    out = StainNormalizer("macenko").fit(target)(source)
    assert out.shape == source.shape and out.dtype == np.uint8
    ref = estimate_stain_matrix(target)
    before, after = stain_angle(estimate_stain_matrix(source), ref), stain_angle(estimate_stain_matrix(out), ref)
    assert after < 0.75 * before


def test_reinhard_moves_the_colour_statistics_toward_the_target(tiles):
    target, source = tiles
    out = StainNormalizer("reinhard").fit(target)(source)
    assert out.shape == source.shape and out.dtype == np.uint8
    def dist(a):
        return np.abs(a.astype(float).mean((0, 1)) - target.astype(float).mean((0, 1))).sum()

    assert dist(out) < 0.2 * dist(source)


def test_stain_errors_are_clear():
    with pytest.raises(ValueError, match="unknown stain"):
        StainNormalizer("vahadane")
    with pytest.raises(RuntimeError, match="fit"):
        StainNormalizer()(np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="RGB uint8"):
        hed_jitter(np.zeros((8, 8), np.float32))
