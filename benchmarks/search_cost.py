"""Cost of the search allocator's scorer on SmolLM2: the one-off set-up (dense log-probabilities
of the held-apart windows + one sequential Wanda pass at the start allocation) and one candidate
(masks applied + a forward of the held-apart windows), in wall and CPU seconds, with peak RSS.

    python benchmarks/search_cost.py --data-dir DATA [--held 8] [--threads 1] [--candidates 4]
"""

from __future__ import annotations

import argparse
import resource
import time


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", default=None)
    p.add_argument("--held", type=int, default=8)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--candidates", type=int, default=4)
    args = p.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    from actpat.data.calibration import calibration_sequences
    from actpat.models.loading import load_model
    from actpat.sparsity.allocation_search import MaskScorer

    def rss() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    lm = load_model("smollm2-135m", "cpu", "float32")
    samples = calibration_sequences(lm.tokenizer, "c4", 64 + args.held, 256, 0, split="train",
                                    data_dir=args.data_dir)
    calib, held = samples.sequences[:64], samples.sequences[64:]
    with open("/proc/loadavg") as f:
        print("load average before:", f.read().split()[:3])
    w0, c0 = time.perf_counter(), time.process_time()
    scorer = MaskScorer(lm.model, calib, held, [0.5] * 30, metric="kl", batch_size=4)
    print(f"set-up: {time.perf_counter() - w0:.1f} s wall, {time.process_time() - c0:.1f} s CPU, "
          f"peak RSS {rss():.0f} MB")
    rng = np.random.default_rng(0)
    for k in range(args.candidates):
        s = np.full(30, 0.5)
        i, j = rng.choice(30, 2, replace=False)
        s[i] += 0.02
        s[j] -= 0.02
        w0, c0 = time.perf_counter(), time.process_time()
        value = scorer(s.tolist())
        print(f"candidate {k}: KL {value:.4f}, {time.perf_counter() - w0:.1f} s wall, "
              f"{time.process_time() - c0:.1f} s CPU, peak RSS {rss():.0f} MB")
    with open("/proc/loadavg") as f:
        print("load average after:", f.read().split()[:3])


if __name__ == "__main__":
    main()
