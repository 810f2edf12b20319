"""Depth pruning: layer scores on fixed inputs, real layer removal, save and reload."""

import copy

import pytest
import torch
from torch import nn

from actpat.sparsity.depth import (activation_scores, block_influence, choose_layers,
                          equivalent_sparsity, lowest_layers, remove_layers, removal_order,
                          search_layers, without_layers)
from actpat.errors import UserError
from actpat.models.architectures import decoder_layers, get_adapter
from actpat.activation.profiling import Profile
from tiny import ARCHS, VOCAB, _configs


def deep_tiny(arch, layers=4, seed=0, **extra):
    """A tiny ``arch`` model with ``layers`` decoder layers."""
    cfg_cls, model_cls, kw = _configs()[arch]
    kw = dict(kw, **extra)
    kw["n_layer" if arch == "gpt2" else "num_hidden_layers"] = layers
    torch.manual_seed(seed)
    return model_cls(cfg_cls(**kw)).eval()


def windows(n=3, t=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (n, t), generator=g).tolist()


def make_identity(layer):
    """Zero the matrices writing into the residual stream: the layer returns its input."""
    with torch.no_grad():
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()


# --------------------------------------------------------------------------- scores


def test_activation_scores_hand_computed():
    maps = {"l0.q": torch.tensor([[0.5, 0.1], [0.0, 2.0]]), "l0.v": torch.tensor([[0.3]]),
            "l1.q": torch.tensor([[0.05, 0.05], [0.05, 9.0]]), "l1.v": torch.tensor([[0.0]])}
    prof = Profile(maps, {"l0.q": 0, "l0.v": 0, "l1.q": 1, "l1.v": 1},
                   {"l0.q": "q", "l0.v": "v", "l1.q": "q", "l1.v": "v"})
    # gamma 0.2: layer 0 has 0.5, 2.0, 0.3 above it; layer 1 only 9.0
    assert activation_scores(prof, gamma=0.2, gamma_quantile=None) == [3.0, 1.0]
    # the mass ranks the other way: one outlier weight dominates layer 1
    assert activation_scores(prof, statistic="mass") == pytest.approx([2.9, 9.15])
    # default: 10% of the 10 weights count, i.e. the largest one (9.0, in layer 1)
    assert activation_scores(prof) == [0.0, 1.0]
    # 30%: gamma is the 7th smallest value (0.3), so 0.5, 2.0 and 9.0 count
    assert activation_scores(prof, gamma_quantile=0.3) == [2.0, 1.0]
    assert removal_order([3.0, 1.0]) == [1, 0]
    with pytest.raises(UserError):
        activation_scores(prof, statistic="median")


def test_removal_order_ties_and_lowest_layers():
    assert removal_order([2.0, 1.0, 1.0, 0.5]) == [3, 1, 2, 0]
    assert lowest_layers([2.0, 1.0, 1.0, 0.5], 2) == [1, 3]
    for bad in (-1, 4, 1.5):
        with pytest.raises(UserError):
            lowest_layers([2.0, 1.0, 1.0, 0.5], bad)


def _reference_bi(model, seqs):
    """1 - mean cos from output_hidden_states, token by token in float64; the final norm is
    replaced by the identity so the last entry is the last layer's raw output."""
    ref = copy.deepcopy(model)
    ref.model.norm = nn.Identity()
    with torch.no_grad():
        hs = ref(input_ids=torch.tensor(seqs), output_hidden_states=True).hidden_states
    out = []
    for i in range(len(hs) - 1):
        x, y = hs[i].double().reshape(-1, hs[i].shape[-1]), hs[i + 1].double().reshape(
            -1, hs[i].shape[-1])
        cos = [float(x[t] @ y[t] / (x[t].norm() * y[t].norm())) for t in range(x.shape[0])]
        out.append(1 - sum(cos) / len(cos))
    return out


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_block_influence_matches_hidden_states(arch):
    model = deep_tiny(arch)
    seqs = windows()
    got = block_influence(model, seqs, batch_size=2)  # two batches: sums over all tokens
    assert got == pytest.approx(_reference_bi(model, seqs), abs=1e-6)


def test_block_influence_of_an_identity_layer_is_zero():
    model = deep_tiny("llama")
    make_identity(decoder_layers(model)[2])
    bi = block_influence(model, windows())
    assert bi[2] == pytest.approx(0.0, abs=1e-6)
    assert min(bi[i] for i in (0, 1, 3)) > 1e-3
    assert removal_order(bi)[0] == 2


def test_block_influence_refuses_ragged_windows():
    with pytest.raises(UserError):
        block_influence(deep_tiny("llama"), [[3, 4, 5], [3, 4]])


# --------------------------------------------------------------------------- removal


def _fresh_reference(model, drop):
    """A model of the same class built from a config with fewer layers, loaded with the kept
    layers' weights under renumbered keys: independent of ``remove_layers``' surgery."""
    n = model.config.num_hidden_layers
    keep = [i for i in range(n) if i not in drop]
    cfg = copy.deepcopy(model.config)
    cfg.num_hidden_layers = len(keep)
    if getattr(cfg, "layer_types", None) is not None:
        cfg.layer_types = [model.config.layer_types[i] for i in keep]
    ref = type(model)(cfg).eval()
    prefix = get_adapter(model).layers + "."
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith(prefix):
            old, rest = key[len(prefix):].split(".", 1)
            if int(old) in drop:
                continue
            key = f"{prefix}{keep.index(int(old))}.{rest}"
        state[key] = value
    ref.load_state_dict(state)
    return ref


def _cached_matches_full(model, ids):
    """Decoding the last token with the KV cache of the prefix gives the full-forward logits."""
    with torch.no_grad():
        full = model(input_ids=ids).logits[:, -1]
        cache = model(input_ids=ids[:, :-1], use_cache=True).cache
        step = model(input_ids=ids[:, -1:], cache=cache, use_cache=True).logits[:, -1]
    return torch.allclose(full, step, atol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_remove_layers_is_a_smaller_model_that_reloads(arch, tmp_path):
    from transformers import AutoModelForCausalLM

    extra = {"sliding_window_pattern": 2} if arch == "gemma3_text" else {}
    model = deep_tiny(arch, layers=5, **extra)
    ids = torch.tensor(windows(2, 12))
    drop = [1, 3]
    with torch.no_grad():
        with without_layers(model, drop):
            trial = model(input_ids=ids).logits
        dense = model(input_ids=ids).logits
    ref = _fresh_reference(model, drop)
    info = remove_layers(model, drop)
    assert info["kept"] == [0, 2, 4] and info["num_layers_after"] == 3
    assert len(decoder_layers(model)) == 3 and model.config.num_hidden_layers == 3
    for j, layer in enumerate(decoder_layers(model)):
        idx = {m.layer_idx for m in layer.modules() if isinstance(getattr(m, "layer_idx", None),
                                                                   int)}
        assert idx == {j}
    with torch.no_grad():
        pruned = model(input_ids=ids).logits
        assert torch.allclose(pruned, ref(input_ids=ids).logits, atol=1e-5)
    assert torch.equal(pruned, trial)
    assert not torch.allclose(pruned, dense, atol=1e-3)
    assert _cached_matches_full(model, ids)
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.config.num_hidden_layers == 3
    with torch.no_grad():
        assert torch.allclose(back(input_ids=ids).logits, pruned, atol=1e-6)
    assert _cached_matches_full(back, ids)


def test_per_layer_config_lists_follow_the_kept_layers():
    model = deep_tiny("gemma3_text", layers=6, sliding_window_pattern=3)
    types = list(model.config.layer_types)
    assert len(set(types)) == 2
    info = remove_layers(model, [0, 2])
    assert info["per_layer_config"] == ["layer_types"]
    assert model.config.layer_types == [types[i] for i in (1, 3, 4, 5)]
    assert [layer.self_attn.layer_type for layer in decoder_layers(model)] == \
        model.config.layer_types


def test_without_layers_restores_the_model():
    model = deep_tiny("qwen2")
    ids = torch.tensor(windows(1, 8))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        with without_layers(model, [0, 3]):
            assert model.config.num_hidden_layers == 2
            assert len(model.config.layer_types) == 2
        after = model(input_ids=ids).logits
    assert torch.equal(before, after)
    assert model.config.num_hidden_layers == 4 and len(model.config.layer_types) == 4
    assert [layer.self_attn.layer_idx for layer in decoder_layers(model)] == [0, 1, 2, 3]
    assert _cached_matches_full(model, ids)


def test_remove_layers_refuses_bad_indices():
    model = deep_tiny("llama", layers=3)
    for bad in ([3], [0, 0], [0, 1, 2], [-1]):
        with pytest.raises(UserError):
            remove_layers(model, bad)
    assert len(decoder_layers(model)) == 3


def test_equivalent_sparsity_is_k_over_layers():
    model = deep_tiny("llama", layers=4)
    assert equivalent_sparsity(model, [0, 3]) == pytest.approx(0.5)
    assert equivalent_sparsity(model, []) == 0.0


# --------------------------------------------------------------------------- search


def _kl_reference(dense, model, seqs):
    """Mean per-token KL(dense || model) with torch's kl_div, model by model."""
    ids = torch.tensor(seqs)
    with torch.no_grad():
        p = torch.log_softmax(dense(input_ids=ids).logits.double(), -1)
        q = torch.log_softmax(model(input_ids=ids).logits.double(), -1)
    kl = nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1)
    return float(kl.mean())


def test_search_trials_are_the_kl_of_each_candidate_removal():
    model = deep_tiny("llama", layers=5)
    seqs = windows(3, 10, seed=1)
    res = search_layers(model, 2, [4, 2, 0, 1, 3], seqs, width=2, objective="kl",
                        batch_size=2)
    # step 1 tries the two first layers of the ranking; step 2 the next two not yet removed
    second = [c for c in [4, 2, 0, 1, 3] if c != res.removed[0]][:2]
    assert [sorted(map(int, s["trials"])) for s in res.steps] == [[2, 4], sorted(second)]
    dense = copy.deepcopy(model)
    for step_no, step in enumerate(res.steps):
        for cand, loss in step["trials"].items():
            trial = copy.deepcopy(dense)
            remove_layers(trial, res.removed[:step_no] + [int(cand)])
            assert loss == pytest.approx(_kl_reference(dense, trial, seqs), rel=1e-4, abs=1e-7)
        assert str(step["chosen"]) == min(step["trials"], key=step["trials"].get)
    assert res.to_json()["evaluations"] == 4
    # the model is unchanged afterwards
    with torch.no_grad():
        ids = torch.tensor(seqs)
        assert torch.equal(model(input_ids=ids).logits, dense(input_ids=ids).logits)


def test_search_finds_the_identity_layer_and_is_reproducible():
    model = deep_tiny("llama", layers=5)
    make_identity(decoder_layers(model)[3])
    seqs = windows(2, 8)
    for objective in ("kl", "ppl"):
        a = search_layers(model, 1, [0, 1, 2, 3, 4], seqs, width=4, objective=objective)
        b = search_layers(model, 1, [0, 1, 2, 3, 4], seqs, width=4, objective=objective)
        assert a.removed == b.removed and a.steps == b.steps
    # removing the identity layer leaves the model as it was: zero KL, the dense perplexity
    # (a random model's perplexity can still drop when another layer goes, so only KL picks it)
    assert a.steps[0]["trials"]["3"] == pytest.approx(a.dense_loss, rel=1e-6)
    kl = search_layers(model, 1, [0, 1, 2, 3, 4], seqs, width=4)
    assert kl.removed == [3]
    assert kl.steps[0]["trials"]["3"] == pytest.approx(0.0, abs=1e-6)
    # width 1 follows the seed ranking blindly
    assert search_layers(model, 2, [1, 0, 2, 3, 4], seqs, width=1).removed == [1, 0]


def test_search_ppl_trial_is_the_windows_mean_nll():
    model = deep_tiny("qwen2", layers=3)
    seqs = windows(2, 8)
    res = search_layers(model, 1, [2, 1, 0], seqs, width=1, objective="ppl")
    trial = copy.deepcopy(model)
    remove_layers(trial, [2])
    ids = torch.tensor(seqs)
    with torch.no_grad():
        logits = trial(input_ids=ids).logits[:, :-1]
    nll = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    assert res.steps[0]["trials"]["2"] == pytest.approx(float(nll), rel=1e-5)


def test_search_refuses_bad_input():
    model = deep_tiny("llama", layers=3)
    with pytest.raises(UserError):
        search_layers(model, 1, [0, 1], windows())
    with pytest.raises(UserError):
        search_layers(model, 1, [0, 1, 2], windows(), objective="bleu")
    with pytest.raises(UserError):
        search_layers(model, 1, [0, 1, 2], windows(), width=0)


# --------------------------------------------------------------------------- real model


def test_smollm2_depth_pruned_checkpoint_reloads(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    model = copy.deepcopy(smollm2.model)
    ids = torch.tensor([smollm2.tokenizer("The capital of France is Paris, and the")
                        ["input_ids"]])
    info = remove_layers(model, [25, 26, 27])
    assert info["num_layers_after"] == 27
    with torch.no_grad():
        pruned = model(input_ids=ids).logits
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert back.config.num_hidden_layers == 27
    with torch.no_grad():
        assert torch.allclose(back(input_ids=ids).logits, pruned, atol=1e-5)
    assert _cached_matches_full(back, ids)
    new = back.generate(ids, max_new_tokens=4, do_sample=False,
                        pad_token_id=smollm2.tokenizer.pad_token_id)
    assert new.shape[1] == ids.shape[1] + 4


def test_choose_layers_records_why():
    model = deep_tiny("llama", layers=4)
    make_identity(decoder_layers(model)[1])
    counts = [5.0, 9.0, 1.0, 3.0]
    drop, why = choose_layers(model, 2, "activation", activation=counts)
    assert drop == [2, 3] and why["removed"] == [2, 3] and why["activation_counts"] == counts
    drop, why = choose_layers(model, 1, "block-influence", calibration=windows())
    assert drop == [1] and why["block_influence"][1] == pytest.approx(0.0, abs=1e-6)
    drop, why = choose_layers(model, 1, "search", activation=counts, held_apart=windows(2),
                              width=4)
    assert drop == [1]  # the identity layer, though the activation ranking puts it last
    assert why["search"]["steps"][0]["trials"]["1"] == pytest.approx(0.0, abs=1e-6)
    for bad in (dict(score="activation"), dict(score="search", activation=counts),
                dict(score="block-influence"), dict(score="random", activation=counts)):
        with pytest.raises(UserError):
            choose_layers(model, 1, **bad)


# --------------------------------------------------------------------------- command line


def _tiny_dir(path, layers=4):
    from tinylm import char_tokenizer

    model = deep_tiny("llama", layers=layers)
    model.config.eos_token_id = model.config.pad_token_id = 1
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return model


def test_cli_drop_layers_only(tmp_path, any_data):
    from transformers import AutoModelForCausalLM

    from actpat.cli import main
    from actpat.data.calibration import calibration_sequences
    from actpat.sparsity.saving import load_record
    from tinylm import char_tokenizer

    dense = _tiny_dir(tmp_path / "tiny")
    out = tmp_path / "short"
    rc = main(["prune", "--model", str(tmp_path / "tiny"), "--sparsity", "0",
               "--drop-layers", "1", "--layer-score", "block-influence", "--calibration", "c4",
               "--calibration-samples", "3", "--seq-len", "24", "--save", str(out),
               "--data-dir", any_data, "--quiet", "--device", "cpu"])
    assert rc == 0
    calib = calibration_sequences(char_tokenizer(), "c4", 3, 24, 0, "train", any_data)
    bi = block_influence(dense, calib.sequences)
    rec = load_record(out)
    assert rec["depth"]["block_influence"] == pytest.approx(bi, abs=1e-6)
    assert rec["depth"]["removed"] == lowest_layers(bi, 1)
    assert rec["pruner"] == "none" and rec["achieved_sparsity"] == 0.0
    assert len(rec["layer_sparsities"]) == 3
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    remove_layers(dense, rec["depth"]["removed"])
    ids = torch.tensor(calib.sequences[:1])
    with torch.no_grad():
        assert torch.allclose(back(input_ids=ids).logits, dense(input_ids=ids).logits,
                              atol=1e-6)


def test_cli_search_then_wanda_on_the_kept_layers(tmp_path, any_data, capsys):
    from transformers import AutoModelForCausalLM

    from actpat.cli import main
    from actpat.models.architectures import scored_matrices
    from actpat.sparsity.saving import load_record
    from helpers import fail

    _tiny_dir(tmp_path / "tiny")
    out = tmp_path / "both"
    common = ["prune", "--model", str(tmp_path / "tiny"), "--calibration", "c4",
              "--calibration-samples", "3", "--seq-len", "24", "--data-dir", any_data,
              "--quiet", "--device", "cpu"]
    rc = main(common + ["--sparsity", "0.5", "--pruner", "wanda", "--allocation", "activation",
                        "--drop-layers", "2", "--layer-score", "search",
                        "--layer-search-samples", "2", "--layer-search-width", "2",
                        "--save", str(out)])
    assert rc == 0
    rec = load_record(out)
    depth = rec["depth"]
    assert len(depth["removed"]) == 2 and depth["num_layers_after"] == 2
    assert depth["search"]["evaluations"] == 4 and depth["search_windows"]["samples"] == 2
    assert not set(depth["search_windows"]["indices"]) & set(rec["calibration"]["indices"])
    counts = depth["activation_counts"]
    assert rec["allocation"]["counts"]["from"].startswith("the dense model's profile")
    assert len(rec["layer_sparsities"]) == 2
    # the activation allocation of the kept layers: fewer activated weights, higher S_i
    kept = depth["kept"]
    s = rec["layer_sparsities"]
    assert (s[0] > s[1]) == (counts[kept[0]] < counts[kept[1]])
    assert rec["achieved_sparsity"] == pytest.approx(0.5, abs=0.02)
    back = AutoModelForCausalLM.from_pretrained(out)
    assert back.config.num_hidden_layers == 2
    zeros = [float((m.weight == 0).float().mean()) for m in scored_matrices(back)]
    assert sum(zeros) / len(zeros) == pytest.approx(0.5, abs=0.05)
    bad = common + ["--sparsity", "0", "--save", str(tmp_path / "x")]
    assert "--drop-layers between 0 and 3" in fail(capsys, *bad, "--drop-layers", "4")
    assert "--drop-layers must be >= 0" in fail(capsys, *bad, "--drop-layers", "-1")
