"""The residual spectrum (model.spectrum): what it computes, and that it joins every embedding on every path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lorax.models.spectrum import ResidualSpectrum
from tests.helpers import REPO

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _normalised(pixels: np.ndarray, mean=MEAN, std=STD) -> torch.Tensor:
    x = torch.from_numpy(pixels).permute(2, 0, 1)[None] / 255
    return (x - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]


def test_matches_a_numpy_reference_and_ignores_the_normalisation() -> None:
    from scipy.ndimage import gaussian_filter

    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.float32)
    grey = pixels @ np.array([0.299, 0.587, 0.114], np.float32)
    resid = grey - gaussian_filter(grey, 1.0, mode="mirror")
    power = np.abs(np.fft.fftshift(np.fft.fft2(resid))) ** 2
    ref = np.log(power + 1e-3).reshape(8, 4, 8, 4).mean((1, 3)).ravel()
    got = ResidualSpectrum(MEAN, STD, grid=8)(_normalised(pixels))[0].numpy()
    np.testing.assert_allclose(got, ref, atol=1e-3)
    other = ResidualSpectrum((0.5,) * 3, (0.5,) * 3, grid=8)(_normalised(pixels, (0.5,) * 3, (0.5,) * 3))[0]
    np.testing.assert_allclose(other.numpy(), ref, atol=1e-3)


def test_sees_an_upsampling_trace() -> None:
    """Nearest-neighbour 2x up-sampling (a decoder's trace) changes the high-frequency half of the map."""
    rng = np.random.default_rng(1)
    plain = rng.normal(128, 30, (32, 32, 3)).clip(0, 255).astype(np.float32)
    up = np.repeat(np.repeat(rng.normal(128, 30, (16, 16, 3)), 2, 0), 2, 1).clip(0, 255).astype(np.float32)
    spec = ResidualSpectrum(MEAN, STD, grid=8)
    a, b = (spec(_normalised(p))[0].view(8, 8) for p in (plain, up))
    # up-sampling by repetition nulls the spectrum at the Nyquist edge (row / column 0 after fftshift)
    assert (a[0] - b[0]).mean() > 3 and (a[:, 0] - b[:, 0]).mean() > 3


def test_grid_must_divide_the_crop() -> None:
    from lorax.config import load_params

    with pytest.raises(ValueError, match=r"spectrum.grid: 5 does not divide model.img_size 16") as err:
        load_params(REPO / "params.yaml", {"model.img_size": 16, "model.spectrum": {"grid": 5}})
    msg = str(err.value)  # one line naming the key and the -S that set it, not a dump of the model section
    assert "\n" not in msg and "model.spectrum.grid: 5" in msg and "-S model.spectrum" in msg and "'backbone'" not in msg
    with pytest.raises(ValueError, match="must divide"):
        ResidualSpectrum(MEAN, STD, grid=5)(torch.zeros(1, 3, 16, 16))


def test_joins_every_embedding_and_agrees_across_paths(params) -> None:
    """LoRAX with adapters in the last block: the spectrum leads each adapter's embedding (identical for every
    task), and the grouped pass, the sequential loop and the backbone's own forward agree."""
    from lorax.models.config import SpectrumConfig
    from lorax.continual.methods import build_method

    p = params.model_copy(deep=True)
    p.model.spectrum = SpectrumConfig(grid=4)
    p.model.feature_levels = [1]
    p.adapter.blocks, p.adapter.last_k = "last_k", 1
    method = build_method(p)
    bb = method.net.backbone
    assert bb.feature_dim == 16 + 3 * bb.embed_dim
    for t in ("a", "b"):
        method.add_task(t)
    net = method.net.eval()
    x = torch.randn(3, 3, p.model.img_size, p.model.img_size)
    with torch.no_grad():
        grouped, seq, plain = net.embeddings(x, one_pass=True), net.embeddings(x, one_pass=False), bb(x)
        direct = bb.spectrum(x)
    assert grouped.shape == (2, 3, bb.feature_dim) and torch.allclose(grouped, seq, atol=1e-5)
    for emb in (grouped[0], grouped[1], plain):
        torch.testing.assert_close(emb[:, :16], direct)
    torch.testing.assert_close(grouped[0, :, : 16 + 2 * bb.embed_dim], plain[:, : 16 + 2 * bb.embed_dim])
