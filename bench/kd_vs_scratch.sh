#!/usr/bin/env bash
# KD students vs scratch over several seeds: the default pipeline's settings (pipelines/default.toml),
# alpha 0 (scratch) and 0.9, seeds 0,1,2; prints the report's mean ± std and KD-against-scratch tables.
#   bash bench/kd_vs_scratch.sh [DATA_SPEC] [WORK_DIR] [extra train-student options...]
#   e.g. bash bench/kd_vs_scratch.sh npz:../shared/data/fashion_mnist.npz /tmp/kdseeds --fuse off
set -euo pipefail
DATA=${1:-fashion-mnist}
WORK=${2:-/tmp/kdpipe-kd-vs-scratch}
shift $(( $# < 2 ? $# : 2 ))
KDPIPE=${KDPIPE:-kdpipe}
mkdir -p "$WORK"
echo "command: bash bench/kd_vs_scratch.sh $DATA $WORK $*"
python3 - <<'PY'
import platform, time, torch
dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or platform.machine()
print(f"machine: {dev}; torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
PY
start=$(date +%s)
[ -f "$WORK/teacher.pt" ] || $KDPIPE train-teacher --data "$DATA" --arch cnn_large --epochs 10 --batch-size 128 \
  --lr 0.05 --policy crop-flip --padding 2 --seed 0 --out "$WORK/teacher.pt"
$KDPIPE dump-logits --teacher "$WORK/teacher.pt" --data "$DATA" --views 10 --policy crop-flip --padding 2 \
  --seed 0 --logits-dtype float16 --batch-size 512 --overwrite --out "$WORK/cache"
$KDPIPE train-student --cache "$WORK/cache" --student mlp_100 --student mlp_800 --epochs 30 \
  --train-samples 2000 --temperature 2 --alpha 0,0.9 --seed 0,1,2 --batch-size 128 --lr 0.05 --out "$WORK/runs" "$@"
$KDPIPE report "$WORK/runs" --out "$WORK/report"
echo "wall time: $(( $(date +%s) - start )) s"
sed -n '/Over seeds/,$p' "$WORK/report/report.md"
