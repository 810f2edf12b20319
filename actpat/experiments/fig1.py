"""Figure 1: profiles of several datasets, their activated-weight counts, one figure.

Each dataset's counts are taken at its own profile's ``gamma_quantile`` (the share of weights
counted as activated is the same for every curve); finished profiles are kept.
"""

from __future__ import annotations

from pathlib import Path


def reproduce_fig1(model: str, out: str | Path, datasets: list[str], samples: int = 64,
                   seq_len: int = 256, seed: int = 0, batch_size: int | str = 4,
                   gamma_quantile: float = 0.1, data_dir: str | None = None,
                   device: str = "cpu", dtype: str = "float32", trust_remote_code: bool = False,
                   progress: bool = True) -> list[dict]:
    """Profile each dataset into ``out/<dataset>`` (skipping finished ones), write
    ``out/counts.json`` and ``out/fig1.png``; return the counts rows."""
    from ..activation.profiling import PROFILE_FILE, Profile, compute_profile, counts
    from ..data.datasets import sample_sequences
    from ..models.loading import load_model
    from ..outputs.plots import plot_layer_counts
    from ..runs import write_json

    out = Path(out)
    lm = None
    results = []
    for d in datasets:
        run_dir = out / d
        if not (run_dir / PROFILE_FILE).exists():
            lm = lm or load_model(model, device, dtype, trust_remote_code)
            s = sample_sequences(lm.tokenizer, d, samples, seq_len, seed, data_dir=data_dir)
            meta = {"model": lm.identity, "dataset": d, "split": s.split,
                    "data_source": s.source, "seq_len": seq_len, "seed": seed,
                    "sample_indices": s.indices, "window_start": s.window_start}
            compute_profile(lm, s.sequences, batch_size, meta=meta,
                            progress=progress).save(run_dir)
        prof = Profile.load(run_dir)
        c = counts(prof, None, gamma_quantile)
        results.append({"run": str(run_dir), "dataset": d,
                        "data_source": prof.meta.get("data_source"), **c.to_json()})
    write_json(out / "counts.json", results)
    plot_layer_counts(results, out / "fig1.png")
    return results
