"""Counts of activated weights (N_i) against a direct computation, and profile round trips."""

import numpy as np
import pytest
import torch

from actpat.errors import UserError
from actpat.activation.profiling import Profile, _gather, counts, threshold


def make_profile(seed=0, layers=3):
    g = torch.Generator().manual_seed(seed)
    maps, lay, mat = {}, {}, {}
    for i in range(layers):
        for t, shape in [("q", (8, 8)), ("up", (16, 8)), ("down", (8, 16))]:
            name = f"model.layers.{i}.{t}"
            maps[name] = torch.rand(shape, generator=g) * (i + 1)
            lay[name], mat[name] = i, t
    return Profile(maps, lay, mat, {"model": "test"})


def test_counts_match_numpy():
    prof = make_profile()
    c = counts(prof, gamma=1.0)
    for i in range(3):
        expect = sum(int((v.numpy() > 1.0).sum()) for k, v in prof.maps.items() if prof.layers[k] == i)
        assert c.layer_counts[i] == expect
        assert c.scored_per_layer[i] == 64 + 128 + 128
    assert [sum(x) for x in zip(*c.matrix_counts.values())] == c.layer_counts
    assert set(c.matrix_counts) == {"q", "up", "down"}


@pytest.mark.parametrize("q", [0.01, 0.1, 0.5, 0.9])
def test_gamma_quantile_puts_that_share_above(q):
    prof = make_profile(1)
    g, rule = threshold(prof, gamma_quantile=q)
    values = np.concatenate([v.numpy().ravel() for v in prof.maps.values()])
    share = (values > g).mean()
    assert abs(share - q) <= 1.0 / values.size + 1e-9
    assert rule == f"quantile={q}"
    assert sum(counts(prof, gamma_quantile=q).layer_counts) == int((values > g).sum())


def test_sampled_quantile_gathers_without_concatenating():
    """Large models estimate gamma on 5e7 sampled weights; the sample is gathered tensor by
    tensor (no whole copy of the maps) and is the same multiset as indexing the concatenation,
    so the estimated gamma of earlier results is unchanged."""
    g = torch.Generator().manual_seed(3)
    flats = [torch.rand(n, generator=g) for n in (7, 1, 30, 2, 64, 5)]
    index = torch.randint(109, (1000,), generator=g)
    direct = torch.cat(flats)[index]
    gathered = _gather(flats, index)
    assert torch.equal(direct.sort().values, gathered.sort().values)
    assert direct.kthvalue(800).values == gathered.kthvalue(800).values


def test_gamma_arguments_are_checked():
    prof = make_profile()
    with pytest.raises(UserError):
        threshold(prof)
    with pytest.raises(UserError):
        threshold(prof, gamma=1.0, gamma_quantile=0.1)
    with pytest.raises(UserError):
        threshold(prof, gamma_quantile=1.5)


def test_save_load_round_trip_and_corruption(tmp_path):
    prof = make_profile()
    prof.save(tmp_path)
    back = Profile.load(tmp_path)
    assert back.meta == {"model": "test"}
    for k in prof.maps:
        assert torch.equal(back.maps[k], prof.maps[k])
    assert back.layer_vector(1).numel() == 64 + 128 + 128
    data = (tmp_path / "profile.safetensors").read_bytes()
    (tmp_path / "profile.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt or truncated"):
        Profile.load(tmp_path)
