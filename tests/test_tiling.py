import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from idgbr.nn.tiling import Window, blend_weights, pad_to_multiple, sliding_window, tile_grid

sizes = st.integers(min_value=1, max_value=300)


def _grid_params():
    return st.tuples(sizes, sizes, st.integers(1, 128)).flatmap(
        lambda t: st.tuples(st.just(t[0]), st.just(t[1]), st.just(t[2]), st.integers(0, t[2] - 1)))


@settings(max_examples=150, deadline=None)
@given(_grid_params())
def test_grid_covers_every_pixel_and_stays_inside(params):
    height, width, tile, overlap = params
    windows = tile_grid(height, width, tile, overlap)
    cover = np.zeros((height, width), dtype=np.int32)
    for w in windows:
        assert 0 <= w.row and 0 <= w.col and w.bottom <= height and w.right <= width
        assert w.height == min(tile, height) and w.width == min(tile, width)
        cover[w.slices] += 1
    assert cover.min() >= 1
    # the last row/column is aligned to the edge
    assert max(w.bottom for w in windows) == height and max(w.right for w in windows) == width
    # neighbours overlap by at least `overlap` pixels
    rows = sorted({w.row for w in windows})
    for a, b in zip(rows, rows[1:]):
        assert a + min(tile, height) - b >= overlap


def test_grid_examples():
    assert tile_grid(53, 70, 512, 64) == [Window(0, 0, 53, 70)]
    grid = tile_grid(100, 100, 64, 16)
    assert [w.row for w in grid[::2]] == [0, 36]
    assert {(w.row, w.col) for w in grid} == {(0, 0), (0, 36), (36, 0), (36, 36)}
    assert len(tile_grid(1000, 10, (256, 8), (32, 2))) == 5 * 2
    with pytest.raises(ValueError):
        tile_grid(10, 10, 8, 8)
    with pytest.raises(ValueError):
        tile_grid(0, 10, 8, 0)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 120), st.integers(1, 120), st.integers(0, 40))
def test_blend_weights_positive_and_ramped(height, width, overlap):
    w = blend_weights(height, width, overlap)
    assert w.shape == (height, width) and w.dtype == np.float32
    assert (w > 0).all() and (w <= 1).all()
    if overlap and height > 2 * overlap and width > 2 * overlap:
        assert w[height // 2, width // 2] == 1.0
        assert w[0, 0] <= w[overlap // 2, overlap // 2] <= w[overlap, overlap] and w[0, 0] < w[overlap, overlap]


@pytest.mark.parametrize("multiple", [1, 8, 32])
def test_pad_to_multiple_numpy_and_torch(multiple):
    array = np.arange(3 * 13 * 7, dtype=np.float32).reshape(3, 13, 7)
    padded, crop = pad_to_multiple(array, multiple)
    assert padded.shape[-2] % multiple == 0 and padded.shape[-1] % multiple == 0
    np.testing.assert_array_equal(padded[..., crop[0], crop[1]], array)
    tensor = torch.from_numpy(array)[None]
    padded_t, crop_t = pad_to_multiple(tensor, multiple)
    assert tuple(padded_t.shape[-2:]) == padded.shape[-2:]
    assert torch.equal(padded_t[..., crop_t[0], crop_t[1]], tensor)
    if multiple == 8:  # reflection is possible here and must match numpy's
        np.testing.assert_array_equal(padded_t[0].numpy(), padded)


@pytest.mark.parametrize("shape,tile,overlap,multiple", [
    ((3, 70, 53), 32, 8, 1),
    ((4, 70, 53), 32, 8, 16),
    ((1, 13, 9), 512, 64, 32),   # smaller than a tile
    ((3, 101, 257), 64, 0, 1),
])
def test_sliding_window_constant_is_exact(shape, tile, overlap, multiple):
    constant = torch.tensor([0.25, 0.5, 0.125, 0.125])

    def predict(batch):
        assert batch.shape[-2] % multiple == 0 and batch.shape[-1] % multiple == 0
        return constant.view(1, -1, 1, 1).expand(batch.shape[0], -1, *batch.shape[-2:]).clone()

    image = np.random.default_rng(0).random(shape, dtype=np.float32)
    out = sliding_window(predict, image, 4, tile=tile, overlap=overlap, batch_size=3, multiple=multiple)
    assert out.shape == (4, *shape[1:]) and out.dtype == np.float32
    np.testing.assert_array_equal(out, np.broadcast_to(constant.numpy()[:, None, None], out.shape))


def test_sliding_window_reassembles_a_pixelwise_function():
    """A pixel-wise predict_fn must give the same result tiled as on the whole image (positions line up)."""
    image = torch.rand(2, 75, 61)

    def predict(batch):
        return torch.softmax(torch.cat([batch, -batch.sum(1, keepdim=True)], 1) * 3, dim=1)

    whole = predict(image[None])[0].numpy()
    tiled = sliding_window(predict, image, 3, tile=24, overlap=6, batch_size=2, multiple=8)
    np.testing.assert_allclose(tiled, whole, atol=1e-6)


def test_sliding_window_rejects_wrong_output_shape():
    with pytest.raises(ValueError, match="expected"):
        sliding_window(lambda b: torch.zeros(b.shape[0], 2, 4, 4), np.zeros((3, 20, 20), np.float32), 3, tile=8, overlap=2)


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 70), st.integers(1, 70), st.integers(1, 40).flatmap(
    lambda t: st.tuples(st.just(t), st.integers(0, t - 1))), st.sampled_from([1, 4, 8]), st.integers(1, 3))
def test_sliding_window_is_exact_for_any_grid(height, width, tile_overlap, multiple, batch_size):
    """Issue 7 §4: through the real blending code, every pixel is covered and the normalised weights sum to 1 —
    a constant prediction comes back exactly and a pixel-wise one equals the untiled result."""
    tile, overlap = tile_overlap
    image = torch.from_numpy(np.random.default_rng(height * 71 + width).random((2, height, width), dtype=np.float32))

    def pixelwise(batch):
        return torch.softmax(torch.cat([batch, -batch.sum(1, keepdim=True)], 1) * 3, dim=1)

    def tiled_fn(batch):
        assert batch.shape[-2] % multiple == 0 and batch.shape[-1] % multiple == 0
        return pixelwise(batch)

    ones = sliding_window(lambda b: torch.ones(b.shape[0], 1, *b.shape[-2:]), image, 1, tile=tile, overlap=overlap,
                          batch_size=batch_size, multiple=multiple)
    np.testing.assert_allclose(ones, 1.0, rtol=1e-6)
    tiled = sliding_window(tiled_fn, image, 3, tile=tile, overlap=overlap, batch_size=batch_size, multiple=multiple)
    np.testing.assert_allclose(tiled, pixelwise(image[None])[0].numpy(), atol=1e-5)
