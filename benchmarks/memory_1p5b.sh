#!/usr/bin/env bash
# Peak RSS and wall time of `actpat profile` on Qwen2.5-Coder-1.5B (float32, CPU, 1 thread) at
# --batch-size 1, 2, 4 (as many C4 samples of 256 tokens as the batch holds, so each run is
# one batch of that size) and one run with --batch-size auto --max-memory 16G (4 samples: the
# planner's probe batches 1 and 2, then the rest at its pick). Each run is its own process
# under /usr/bin/time -v. Writes benchmarks/results/memory-qwen2.5-coder-1.5b.json.
#
#   bash benchmarks/memory_1p5b.sh            # from the repository root
#
# The GGUF must already be dequantised into the actpat cache (the first load does it; its
# cost is not part of these runs). Env: ACTPAT_DATA_DIR (default /work/shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${MODEL:-$(/work/shared/models/get-model qwen2.5-coder-1.5b)}
OUT=${OUT:-runs/memory-1p5b}
RESULT=${RESULT:-benchmarks/results/memory-qwen2.5-coder-1.5b.json}
export ACTPAT_DATA_DIR=${ACTPAT_DATA_DIR:-/work/shared/data} HF_HUB_OFFLINE=1 \
  HF_DATASETS_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$OUT"
# name | samples | batch-size | extra options
RUNS=("b1|1|1|" "b2|2|2|" "b4|4|4|" "auto16G|4|auto|--max-memory 16G")
for spec in "${RUNS[@]}"; do
  IFS='|' read -r name samples bs extra <<<"$spec"
  [ -n "${ONLY:-}" ] && [[ ",$ONLY," != *",$name,"* ]] && continue
  if [ "$bs" != auto ] && [ "$bs" -gt 2 ] && [ -f "$OUT/b1.time" ] && [ -f "$OUT/b2.time" ]; then
    # predict the peak from b1 and b2 (linear in the batch) and skip a run that would not fit
    # the RAM available now (an OOM kill could hit another job on a shared machine)
    p1=$(awk -F': ' '/Maximum resident/{print $2}' "$OUT/b1.time")
    p2=$(awk -F': ' '/Maximum resident/{print $2}' "$OUT/b2.time")
    need=$(( p2 + (p2 - p1) * (bs - 2) ))
    avail=$(awk '/MemAvailable/{print $2}' /proc/meminfo)
    if [ "$need" -gt $(( avail * 9 / 10 )) ] && [ -z "${FORCE:-}" ]; then
      echo "== $name: skipped: predicted peak ${need} kB > 90% of MemAvailable ${avail} kB (FORCE=1 runs it)"
      echo "skipped predicted_peak_kb=$need mem_available_kb=$avail" >"$OUT/$name.skipped"
      continue
    fi
  fi
  rm -f "$OUT/$name.skipped"
  echo "== $name: --samples $samples --batch-size $bs $extra ($(date -u +%T))"
  # shellcheck disable=SC2086
  nice -n 10 /usr/bin/time -v -o "$OUT/$name.time" .venv/bin/actpat profile --model "$MODEL" \
    --dataset c4 --samples "$samples" --seq-len 256 --batch-size "$bs" $extra \
    --dtype float32 --device cpu --no-cache --quiet --overwrite --checkpoint-every 0 \
    --out "$OUT/$name" >"$OUT/$name.log" 2>&1 || { echo "failed, see $OUT/$name.log"; exit 1; }
  tail -n 2 "$OUT/$name.log"
done
.venv/bin/python - "$MODEL" "$OUT" "$RESULT" <<'EOF'
import json, os, platform, re, sys, time
from pathlib import Path
from safetensors import safe_open
from actpat.models.gguf_cache import gguf_to_safetensors

model, out, result = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
cache, _ = gguf_to_safetensors(model)  # the existing cache entry (no work when present)
params = scored = 0
for f in sorted(Path(cache).glob("*.safetensors")):
    with safe_open(f, "pt") as st:
        for k in st.keys():
            n = 1
            for d in st.get_slice(k).get_shape():
                n *= d
            params += n
            if k.startswith("model.layers.") and k.endswith(".weight") and "norm" not in k:
                scored += n
fp32 = 4 * params
runs = []
for name in ("b1", "b2", "b4", "auto16G"):
    t = out / f"{name}.time"
    skip = out / f"{name}.skipped"
    if skip.exists():
        kv = dict(x.split("=") for x in skip.read_text().split()[1:])
        runs.append(dict(run=name, skipped=True, samples=int(name[1:]), batch_size=int(name[1:]),
                         predicted_peak_gb=round(int(kv["predicted_peak_kb"]) * 1024 / 1e9, 3),
                         predicted_ratio_to_fp32_model=round(
                             int(kv["predicted_peak_kb"]) * 1024 / (4 * params), 3),
                         mem_available_gb=round(int(kv["mem_available_kb"]) * 1024 / 1e9, 3),
                         why="predicted linearly from b1 and b2; would not fit the RAM "
                             "available next to the other jobs"))
        continue
    if not t.exists():
        continue
    text = t.read_text()
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", text).group(1))
    el = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): ([\d:.]+)", text).group(1)
    secs = sum(float(x) * 60 ** i for i, x in enumerate(reversed(el.split(":"))))
    cpu = sum(float(re.search(rf"{k} time \(seconds\): ([\d.]+)", text).group(1))
              for k in ("User", "System"))
    meta = json.loads((out / name / "summary.json").read_text())
    meta = meta.get("meta", meta)
    n = meta["samples"]
    runs.append(dict(
        run=name, samples=n, batch_size_requested=meta.get("batch_planner", {}).get(
            "requested", meta.get("batch_size")), batch_size=meta.get("batch_size"),
        peak_rss_bytes=rss_kb * 1024, peak_rss_gb=round(rss_kb * 1024 / 1e9, 3),
        ratio_to_fp32_model=round(rss_kb * 1024 / fp32, 3),
        process_wall_s=round(secs, 1), process_cpu_s=round(cpu, 1),
        profile_loop_wall_s=meta.get("wall_time_s"),
        s_per_sample=round(meta["wall_time_s"] / n, 2),
        batch_planner=meta.get("batch_planner")))
doc = dict(
    what="actpat profile peak RSS / wall time by batch size, Qwen2.5-Coder-1.5B, C4 x 256 tokens",
    date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    script="benchmarks/memory_1p5b.sh", model=os.path.abspath(model),
    gguf_bytes=os.path.getsize(model), parameters=params, fp32_param_bytes=fp32,
    scored_weights=scored, fp32_map_bytes=4 * scored, dtype="float32", device="cpu",
    torch_threads=1, seq_len=256, dataset="c4", machine=platform.processor() or platform.machine(),
    cpus=os.cpu_count(), load_avg=os.getloadavg(), runs=runs)
result.parent.mkdir(parents=True, exist_ok=True)
result.write_text(json.dumps(doc, indent=2) + "\n")
print(json.dumps({k: v for k, v in doc.items() if k != "runs"}, indent=1))
for r in runs:
    print(r["run"], r["samples"], r["batch_size"], r.get("peak_rss_gb"),
          r.get("ratio_to_fp32_model"), r.get("s_per_sample"), r.get("process_wall_s"),
          "skipped, predicted %s GB" % r["predicted_peak_gb"] if r.get("skipped") else "")
EOF
