"""Scale: distributed profiling (2 gloo processes), auto batch size and OOM halving, offload."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import actpat.models.memory as memory
import actpat.activation.profiling as profile_mod
from actpat.activation.distributed import Ranks, shard, shard_positions
from actpat.errors import UserError
from actpat.models.memory import BatchPlanner, is_oom, parse_size
from actpat.activation.profiling import Profile, compute_profile
from helpers import LM, PROSE, ROOT
from helpers import max_rel_abs as _max_rel
from helpers import random_lengths_sequences as _seqs
from reference import autograd_activations
from tiny import tiny_model
from tinylm import save_tiny_lm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --------------------------------------------------------------------------- distributed


def test_shard_covers_every_sample_once():
    items = list(range(11))
    parts = [shard(items, Ranks(r, 3)) for r in range(3)]
    assert sorted(sum(parts, [])) == items
    assert [len(p) for p in parts] == [4, 4, 3]
    assert shard_positions(11, Ranks(1, 3)) == parts[1]


def test_context_from_env_validates():
    assert Ranks.from_env({}) == Ranks(0, 1, 0)
    assert Ranks.from_env({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}).rank == 1
    with pytest.raises(UserError):
        Ranks.from_env({"RANK": "2", "WORLD_SIZE": "2"})


def _cli(args, env_extra=None, timeout=300):
    env = dict(os.environ, **(env_extra or {}))
    env.setdefault("ACTPAT_DATA_DIR", str(ROOT))
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env,
                          cwd=ROOT)


def test_torchrun_two_gloo_processes_equal_one_process(tmp_path):
    """`torchrun --nproc_per_node 2 -m actpat profile` == the single-process profile."""
    model_dir = save_tiny_lm(tmp_path / "lm")
    common = ["--model", model_dir, "--dataset", str(PROSE), "--samples", "7", "--seq-len", "40",
              "--batch-size", "2", "--device", "cpu", "--quiet", "--no-cache"]
    env = {"ACTPAT_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    single = _cli([sys.executable, "-m", "actpat", "profile", *common, "--out",
                   str(tmp_path / "one")], env)
    assert single.returncode == 0, single.stderr
    torchrun = Path(sys.executable).with_name("torchrun")
    multi = _cli([str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()),
                  "-m", "actpat", "profile", *common, "--out", str(tmp_path / "two")], env)
    assert multi.returncode == 0, multi.stderr[-3000:]
    a, b = Profile.load(tmp_path / "two"), Profile.load(tmp_path / "one")
    assert a.meta["world_size"] == 2 and b.meta.get("world_size") is None
    assert a.meta["samples"] == b.meta["samples"] == 7
    assert a.meta["tokens_scored"] == b.meta["tokens_scored"]
    assert _max_rel(a.maps, b.maps) <= 1e-6
    assert not (tmp_path / "two" / "checkpoint").exists()
    # only rank 0 wrote: the run directory holds exactly the profile and its summary
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == ["profile.safetensors",
                                                                    "summary.json"]



def _pairs_file(path: Path) -> Path:
    import json

    words = PROSE.read_text().split()
    rows = [{"sentence1": " ".join(words[i:i + 6 + i % 5]),
             "sentence2": " ".join(words[i + 3:i + 9 + i % 3]), "score": float(i % 6)}
            for i in range(0, 70, 7)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("command", ["similarity", "sts"])
def test_torchrun_similarity_and_sts_equal_one_process(tmp_path, command):
    """`torchrun --nproc_per_node 2 -m actpat similarity|sts` == one process; rank 0 writes."""
    import json

    model_dir = save_tiny_lm(tmp_path / "lm")
    if command == "similarity":
        args = ["similarity", "--dataset", str(PROSE), "--pairs", "5", "--seq-len", "24",
                "--pairs-per-batch", "2"]
        owned = ["similarity.json", "similarity_boxes.png", "similarity_median.png"]
    else:
        args = ["sts", "--dataset", str(_pairs_file(tmp_path / "pairs.jsonl")),
                "--samples", "0", "--pairs-per-batch", "3", "--bootstrap", "200"]
        owned = ["sts.json", "sts_layers.png"]
    common = [*args, "--model", model_dir, "--device", "cpu", "--quiet"]
    env = {"OMP_NUM_THREADS": "1"}
    one = _cli([sys.executable, "-m", "actpat", *common, "--out", str(tmp_path / "one")], env)
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = Path(sys.executable).with_name("torchrun")
    two = _cli([str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()),
                "-m", "actpat", *common, "--out", str(tmp_path / "two")], env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(owned)
    a, b = (json.loads((tmp_path / d / owned[0]).read_text()) for d in ("two", "one"))
    assert a["world_size"] == 2 and b["world_size"] == 1
    if command == "similarity":
        got, want = a["comparisons"][0]["per_pair"], b["comparisons"][0]["per_pair"]
        assert len(want) == 5
    else:
        got = [a["pair_similarity"], *a["baseline_pair_similarity"].values()]
        want = [b["pair_similarity"], *b["baseline_pair_similarity"].values()]
        assert len(want[0]) == 10
        assert a["per_layer_spearman"] == pytest.approx(b["per_layer_spearman"], abs=1e-9)
    import numpy as np

    np.testing.assert_allclose(np.array(got, dtype=float), np.array(want, dtype=float),
                               rtol=1e-6, atol=1e-12)


# --------------------------------------------------------------------------- memory


def test_parse_size_and_oom_detection():
    assert parse_size("4GB") == 4 * 10**9
    assert parse_size("512MiB") == 512 * 2**20
    assert parse_size("1.5kb") == 1500
    with pytest.raises(UserError):
        parse_size("lots")
    assert is_oom(torch.OutOfMemoryError("CUDA out of memory"))
    assert is_oom(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried ..."))
    assert is_oom(MemoryError())
    assert not is_oom(RuntimeError("shape mismatch"))
    with pytest.raises(UserError):
        BatchPlanner(0)


def test_planner_fits_largest_batch_inside_budget():
    # steady base 1000 B, 50 B per sample: budget 1000 + 50 * 7 + 10 fits 7
    p = BatchPlanner("auto", budget=1000 + 50 * 7 + 10)
    assert p.next_size(100) == 1
    p.observe(1, 0, 900 + 50)  # warm-up: the model paged in during it; ignored by the fit
    assert p.next_size(100) == 1 and p.chosen is None
    p.observe(1, 1020, 1000 + 50)  # probes: absolute peaks (memory kept from the warm-up
    assert p.next_size(100) == 2     # counts in `before`, not twice in the peak)
    p.observe(2, 1040, 1000 + 100)
    assert p.chosen == 7 and p.next_size(100) == 7 and p.next_size(3) == 3
    assert p.predicted_peak(7) == 1000 + 50 * 7 and p.describe()["warmup"] == (1, 0, 950)
    p.shrink(7)
    assert p.next_size(100) == 3
    tight = BatchPlanner("auto", budget=1000)  # nothing fits: still one sample at a time
    tight.observe(1, 0, 1200)
    tight.observe(1, 1000, 1200)
    tight.observe(2, 1000, 1300)
    assert tight.chosen == 1


def test_planner_is_not_fooled_by_the_first_batch_paging_in_the_model():
    """The Qwen-1.5B case (BENCHMARKS.md): before the first batch the RSS is 0.56 GB, the model
    (7.1 GB) and the maps' sums (5.2 GB) appear during it; each sample then costs ~1.9 GB on a
    12 GB base. A 16 GB budget fits 2 samples, and the prediction must say ~15.8 GB, not less."""
    gb = 10**9
    p = BatchPlanner("auto", budget=16 * gb)
    p.observe(1, int(0.56 * gb), int(13.88 * gb))  # warm-up
    p.observe(1, int(13.4 * gb), int(13.88 * gb))
    p.observe(2, int(13.8 * gb), int(15.80 * gb))
    assert p.chosen == 2
    assert abs(p.per_sample - 1.92 * gb) < 0.01 * gb
    assert 15.7 * gb < p.predicted_peak(2) <= 16 * gb
    p12 = BatchPlanner("auto", budget=12.5 * gb)  # below base + 1 sample: one at a time
    for obs in [p.warmup, *p.probes]:
        p12.observe(*obs)
    assert p12.chosen == 1


def test_auto_batch_size_under_a_small_budget_is_exact(monkeypatch):
    """--batch-size auto with a budget fitting 3 samples: batches 1, 1, 2, then 3; exact."""
    model = tiny_model("llama")
    seqs = _seqs(10, seed=1)
    seen = []
    orig = profile_mod.score_batch

    def recording(model, ids, mask, sinks, objective, mats):
        seen.append(ids.shape[0])
        return orig(model, ids, mask, sinks, objective, mats)

    class FakeProbe:  # memory grows by 1000 B per sample in the batch being scored
        def __init__(self, device):
            pass

        def current(self):
            return 10_000

        def reset_peak(self):
            return True

        def peak(self):
            return 10_000 + 500 + 1000 * seen[-1]

    monkeypatch.setattr(profile_mod, "score_batch", recording)
    monkeypatch.setattr(memory, "MemoryProbe", FakeProbe)
    prof = compute_profile(LM(model), seqs, "auto", progress=False, max_memory=10_000 + 500 + 3400)
    assert seen == [1, 1, 2, 3, 3]  # warm-up, probes 1 and 2, then the fitted 3
    assert prof.meta["batch_size"] == 3 and prof.meta["batch_planner"]["chosen"] == 3
    assert _max_rel(prof.maps, autograd_activations(model, seqs)) <= 1e-5


PROBE_SCRIPT = """
import torch
from actpat.models import memory
probe = memory.MemoryProbe("cpu")
if not probe.reset_peak():
    print("skip")
else:
    before = probe.current()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del block
    print(probe.peak() - before)
"""


def test_real_memory_probe_measures_cpu_peak():
    # A fresh process: in a long test session freed memory stays resident and is reused, so a
    # new 64 MiB block need not raise the peak at all.
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", PROBE_SCRIPT], capture_output=True, text=True,
                         check=True).stdout.strip()
    if out == "skip":
        pytest.skip("/proc/self/clear_refs not writable here")
    assert int(out) >= 50 * 2**20


@pytest.mark.parametrize("fail_at", [1, 5])  # in the first backward hook, or after 4 matrices
def test_oom_halves_the_batch_and_loses_no_sample(monkeypatch, fail_at):
    model = tiny_model("qwen2")
    seqs = _seqs(7, seed=2)
    seen = []
    orig = profile_mod.score_batch

    def flaky(model, ids, mask, sinks, objective, mats):
        seen.append(ids.shape[0])
        calls = {"n": 0}

        class Boom:  # runs before the accumulator: matrices before fail_at are already added
            def add(self, m, acts):
                calls["n"] += 1
                if acts.shape[0] > 2 and calls["n"] == fail_at:
                    raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

        return orig(model, ids, mask, [Boom(), *sinks], objective, mats)

    monkeypatch.setattr(profile_mod, "score_batch", flaky)
    prof = compute_profile(LM(model), seqs, 4, progress=False)
    assert seen == [4, 2, 2, 2, 1]
    assert prof.meta["samples"] == 7 and prof.meta["batch_planner"]["capped_after_oom"] == 2
    assert _max_rel(prof.maps, autograd_activations(model, seqs)) <= 1e-5


def test_oom_on_a_single_sample_is_a_user_error(monkeypatch):
    def always(*a, **k):
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    monkeypatch.setattr(profile_mod, "score_batch", always)
    with pytest.raises(UserError, match="single sample"):
        compute_profile(LM(tiny_model("llama")), _seqs(3), 2, progress=False)


# --------------------------------------------------------------------------- offload


@pytest.mark.parametrize("budget", ["20KB", "60KB"])  # everything on disk / embeddings in RAM
def test_device_map_offload_profile_equals_plain(tmp_path, budget):
    from actpat.models.loading import load_model
    from actpat.models.offload import load_dispatched

    model_dir = save_tiny_lm(tmp_path / "lm", "llama")
    seqs = _seqs(5, seed=3)
    plain = compute_profile(load_model(model_dir, "cpu"), seqs, 2, progress=False)
    lm = load_dispatched(model_dir, max_memory=budget, offload_dir=tmp_path / "off")
    assert "disk" in lm.identity["device_map"]
    off = compute_profile(lm, seqs, 2, progress=False)
    assert _max_rel(off.maps, plain.maps) <= 1e-6


@pytest.mark.parametrize("budget", ["20KB", "60KB"])
def test_profile_cli_device_map_auto_max_memory_equals_plain(tmp_path, budget):
    """`actpat profile --device-map auto --max-memory SIZE`: dispatched over CPU and disk as
    the budget says, recorded in summary.json, and the same maps as a plain run."""
    import json

    from actpat.cli import main

    model_dir = save_tiny_lm(tmp_path / "lm")
    base = ["profile", "--model", model_dir, "--dataset", str(PROSE), "--samples", "4",
            "--seq-len", "24", "--batch-size", "2", "--device", "cpu", "--quiet", "--no-cache"]
    assert main([*base, "--out", str(tmp_path / "plain")]) == 0
    assert main([*base, "--device-map", "auto", "--max-memory", budget, "--out",
                 str(tmp_path / "mapped")]) == 0
    summary = json.loads((tmp_path / "mapped" / "summary.json").read_text())
    where = summary["device_map"]
    assert where.get("disk", 0) >= 1, where  # the budget pushed weights to disk
    if budget == "60KB":
        assert where.get("cpu", 0) >= 1, where
    a, b = Profile.load(tmp_path / "mapped"), Profile.load(tmp_path / "plain")
    assert _max_rel(a.maps, b.maps) <= 1e-6


def test_profile_cli_max_memory_list_needs_device_map(tmp_path, capsys):
    from helpers import fail

    model_dir = save_tiny_lm(tmp_path / "lm")
    msg = fail(capsys, "profile", "--model", model_dir, "--dataset", PROSE, "--samples", "2",
               "--max-memory", "cpu=1GB", "--out", tmp_path / "o", "--device", "cpu")
    assert "--device-map auto" in msg
    msg = fail(capsys, "profile", "--model", model_dir, "--dataset", PROSE, "--samples", "2",
               "--device-map", "auto", "--max-memory", "lots", "--out", tmp_path / "o")
    assert "lots" in msg


@pytest.mark.slow
def test_smollm2_with_a_small_memory_budget_equals_unconstrained(tmp_path, smollm2):
    """SmolLM2 dispatched with 150 MB of RAM for weights (the rest on disk) == plain run."""
    from actpat.models.offload import load_dispatched

    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(10, 40000, (24,), generator=g).tolist() for _ in range(2)]
    plain = compute_profile(smollm2, seqs, 2, progress=False)
    lm = load_dispatched("smollm2-135m", max_memory="150MB", offload_dir=tmp_path / "off")
    assert lm.identity["device_map"].get("disk", 0) >= 1
    off = compute_profile(lm, seqs, 2, progress=False)
    assert _max_rel(off.maps, plain.maps) <= 1e-6


def test_gpu_benchmark_script_runs_on_a_tiny_shape(tmp_path):
    """benchmarks/gpu.py --tiny: the GPU benchmark's code path, on CPU, in seconds."""
    import json

    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import gpu
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    out = tmp_path / "gpu.json"
    assert gpu.main(["--tiny", "--out", str(out), "--no-markdown"]) == 0
    result = json.loads(out.read_text())
    assert [r["batch_size"] for r in result["profiling"]] == [1, 2]
    assert all(r["actpat"]["tokens_per_s"] > 0 and r["plain"]["tokens_per_s"] > 0
               for r in result["profiling"])
    assert result["wanda"]["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "opt"])
@pytest.mark.parametrize("pruner", ["wanda", "sparsegpt"])
def test_offloaded_pruning_equals_plain_pruning(arch, pruner):
    """prune_offloaded (one decoder layer on the compute device at a time) == prune_model.

    On this CPU-only machine the compute device is the CPU too, so this checks the mechanics
    (hooks, argument moves, layer order, clean-up) and the result, not a real transfer.
    """
    import copy

    from actpat.sparsity.layerwise import prune_offloaded
    from actpat.sparsity.layerwise import prune_model

    plain = tiny_model(arch)
    offloaded = copy.deepcopy(plain)
    g = torch.Generator().manual_seed(0)
    calib = torch.randint(2, 101, (6, 16), generator=g).tolist()
    prune_model(plain, calib, [0.5, 0.3], pruner, batch_size=4, progress=False)
    report = prune_offloaded(offloaded, calib, [0.5, 0.3], pruner, batch_size=4, progress=False,
                             device="cpu")
    assert report["offload"]["layers_loaded"] == [0, 1]
    a, b = plain.state_dict(), offloaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any((v == 0).float().mean() > 0.2 for v in b.values())  # it did prune
    from actpat.models.architectures import decoder_layers

    assert not any(layer._forward_pre_hooks for layer in decoder_layers(offloaded))


_TWO_RANK_SIMILARITY = """
import os, sys
import numpy as np
import torch
sys.path.insert(0, {tests!r})
from tiny import tiny_model
from actpat.activation.distributed import init, Ranks, shutdown
import actpat.analysis.similarity as S
from actpat.analysis.similarity import pair_similarity

ctx = init(Ranks.from_env(), "cpu")
batches = []
orig = S.score_batch
def counting(model, ids, *a, **k):
    batches.append(ids.shape[0])
    return orig(model, ids, *a, **k)
S.score_batch = counting
class LM:
    model = tiny_model("llama")
    tokenizer = type("T", (), {{"pad_token_id": 0}})()
g = torch.Generator().manual_seed(5)
seqs = [torch.randint(2, 101, (int(torch.randint(4, 20, (1,), generator=g)),),
                      generator=g).tolist() for _ in range(10)]
pairs = list(zip(seqs[:5], seqs[5:]))
sims = pair_similarity(LM(), pairs, pairs_per_batch=2)
np.save(sys.argv[1] + f"/rank{{ctx.rank}}.npy", sims.layer)
np.save(sys.argv[1] + f"/batches{{ctx.rank}}.npy", np.array(batches))
shutdown()
"""


def test_pair_similarity_two_gloo_processes_equal_one_process(tmp_path):
    """Similarity (and STS, which scores through pair_similarity) sharded over 2 ranks."""
    import numpy as np

    script = _TWO_RANK_SIMILARITY.format(tests=str(Path(__file__).parent))
    port = str(_free_port())
    procs = []
    for rank in range(2):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], env=env,
                                      stderr=subprocess.PIPE, text=True))
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-3000:]
    single_env = {k: v for k, v in os.environ.items()
                  if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    one = tmp_path / "one"
    one.mkdir()
    proc = subprocess.run([sys.executable, "-c", script, str(one)], env=single_env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ref = np.load(one / "rank0.npy")
    assert ref.shape == (5, 2)
    assert np.load(one / "batches0.npy").tolist() == [4, 4, 2]  # 3 batches of pairs
    # the batches were shared out: rank 0 scored batches 0 and 2, rank 1 batch 1
    assert np.load(tmp_path / "batches0.npy").tolist() == [4, 2]
    assert np.load(tmp_path / "batches1.npy").tolist() == [4]
    for rank in range(2):  # every rank holds all pairs, in input order
        got = np.load(tmp_path / f"rank{rank}.npy")
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=0)


def test_prune_cli_offload_cpu_equals_plain(tmp_path, any_data):
    """`actpat prune --offload cpu` (one decoder layer on the device at a time) == plain."""
    import json

    from safetensors.torch import load_file

    from actpat.cli import main

    model_dir = save_tiny_lm(tmp_path / "lm")
    base = ["prune", "--model", model_dir, "--sparsity", "0.5", "--pruner", "wanda",
            "--calibration", "c4", "--data-dir", any_data, "--calibration-samples", "4",
            "--seq-len", "32", "--device", "cpu", "--quiet"]
    assert main([*base, "--save", str(tmp_path / "plain")]) == 0
    assert main([*base, "--offload", "cpu", "--save", str(tmp_path / "off")]) == 0
    a = load_file(str(tmp_path / "plain" / "model.safetensors"))
    b = load_file(str(tmp_path / "off" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    record = json.loads((tmp_path / "off" / "actpat_prune.json").read_text())
    assert record["offload"]["layers_loaded"] == [0, 1]
    assert 0.45 < record["achieved_sparsity"] < 0.55
