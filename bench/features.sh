#!/usr/bin/env bash
# Cached features and hint losses on CPU (issue 12): bytes per cache row with and without features, and
# KD against KD plus a hint for one small student, from one teacher pass each.
#   bash bench/features.sh [DATA_SPEC] [WORK_DIR] [LIMIT]
#   e.g. bash bench/features.sh fashion-mnist /tmp/kdfeat 10000
# Teacher cnn_small; caches of K = 6 crop:2+flip views, one of logits only and one with the teacher's
# features at head.2 (the 64-unit hidden layer, (64,)) and pool (the pooled map, (32, 2, 2)); students
# mlp:64, 6 epochs with Adam: scratch (alpha 0) and KD (T 4, alpha 0.9) from the logits cache, KD plus a
# hint (kd:1,hint:W) from the features cache, its projector a 64 -> 64 linear map from the student's
# hidden layer (net.2) onto head.2; seeds 0 and 1.
set -euo pipefail
DATA=${1:-fashion-mnist}
WORK=${2:-/tmp/kdpipe-features}
LIMIT=${3:-10000}
HINT=${HINT:-10}
KDPIPE=${KDPIPE:-kdpipe}
mkdir -p "$WORK"
echo "command: HINT=$HINT bash bench/features.sh $DATA $WORK $LIMIT"
python3 - <<'PY'
import os, platform, time
print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores visible; "
      f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
PY
start=$(date +%s)
D=(--data "$DATA" --limit "$LIMIT")
[ -f "$WORK/teacher.pt" ] || $KDPIPE train-teacher "${D[@]}" --arch cnn_small --epochs 4 --batch-size 128 \
  --lr 0.05 --policy crop-flip --padding 2 --seed 0 --out "$WORK/teacher.pt"
V=(--views 6 --policy crop:2+flip --seed 0 --batch-size 512)
$KDPIPE dump-logits --teacher "$WORK/teacher.pt" "${D[@]}" "${V[@]}" --out "$WORK/cache-logits"
$KDPIPE dump-logits --teacher "$WORK/teacher.pt" "${D[@]}" "${V[@]}" --features head.2,pool --out "$WORK/cache-features"
$KDPIPE inspect "$WORK/cache-logits" | grep -E "shards|logits "
$KDPIPE inspect "$WORK/cache-features" | grep -E "shards|features"
S=(--student mlp:64 --epochs 6 --optimizer adam --lr 0.002 --seed 0,1 --batch-size 128)
$KDPIPE train-student --cache "$WORK/cache-logits" "${S[@]}" --alpha 0,0.9 --out "$WORK/runs"
$KDPIPE train-student --cache "$WORK/cache-features" "${S[@]}" --loss "kd:1,hint:$HINT" --hint-layer net.2 \
  --hint-feature head.2 --out "$WORK/runs"
echo "wall time: $(( $(date +%s) - start )) s"
python3 - "$WORK" <<'PY'
import json, sys
from pathlib import Path
for c in ("cache-logits", "cache-features"):
    m = json.loads((Path(sys.argv[1]) / c / "manifest.json").read_text())
    shards = sum(s["bytes"] for s in m["shards"])
    print(f"{c}: {m['rows']} rows, {shards} bytes in shards, {shards / m['rows']:.1f} bytes per row on disk")
print("run | test top-1 | agreement with the teacher | final terms")
for p in sorted((Path(sys.argv[1]) / "runs").glob("*/metrics.json")):
    r = json.loads(p.read_text())
    terms = ", ".join(f"{k} {v[-1]:.4f}" for k, v in r["train_terms"].items())
    print(f"{r['name']} | {r['test_top1']:.4f} | {r['teacher_agreement']:.4f} | {terms}")
PY
