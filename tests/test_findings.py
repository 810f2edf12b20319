from actpat.findings import bands, finding1


def test_bands_cover_all_layers_once():
    for n in (12, 18, 30, 32):
        b = bands(n)
        layers = [i for r in b.values() for i in r]
        assert sorted(layers) == list(range(n))


def _entry(name, shares):
    return {"run": name, "dataset": name, "layer_counts": [int(s * 100) for s in shares],
            "scored_per_layer": [100] * len(shares)}


def test_finding1_on_a_pattern_that_follows_the_paper_and_one_that_does_not():
    paper_like = [0.1, 0.5, 0.5, 0.4, 0.3, 0.2, 0.1, 0.1, 0.1]
    general = [0.1, 0.5, 0.5, 0.4, 0.3, 0.3, 0.3, 0.3, 0.3]
    inverted = [0.6, 0.1, 0.1, 0.2, 0.3, 0.4, 0.5, 0.5, 0.5]
    out = finding1([_entry("boolq", paper_like), _entry("c4", general), _entry("odd", inverted)])
    v = out["verdict"]
    assert v["shallow_denser_than_deep"] == {"boolq": True, "c4": True, "odd": False}
    assert v["first_sparser_than_shallow"] == {"boolq": True, "c4": True, "odd": False}
    assert out["per_dataset"]["boolq"]["first"] == 0.1
    assert abs(out["per_dataset"]["boolq"]["shallow"] - (0.5 + 0.5 + 0.4) / 3) < 1e-12
    assert v["general_keeps_more_deep_activation"] is False  # 'odd' is very dense in deep layers
    out = finding1([_entry("boolq", paper_like), _entry("c4", general)])
    assert out["verdict"]["general_keeps_more_deep_activation"] is True
