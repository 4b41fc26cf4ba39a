#!/usr/bin/env bash
# GPU check of both stages end to end (CI has no GPU): mixed views dumped under bf16 autocast and
# verified, students with AdamW, a validation split and fused torch.compile, a pass killed with SIGKILL
# and resumed (compared with an uninterrupted run), and exports. Prints what it measured.
# Usage (on a CUDA machine, from the repository root): bash bench/gpu_check.sh NPZ [WORKDIR]
set -euo pipefail
NPZ=${1:?give the Fashion-MNIST npz}; W=${2:-$(mktemp -d)}
KD="python3 -m kdpipe"; D="npz:$NPZ"; L="--limit 20000"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))"
t() { local s; s=$(date +%s%N); "$@"; echo "TIME $(( ($(date +%s%N) - s) / 1000000 )) ms: ${*:4:1}"; }
t $KD train-teacher --data $D $L --arch cnn_small --epochs 3 --device cuda --overwrite --out $W/t.pt | tail -2
t $KD dump-logits --teacher $W/t.pt --data $D $L --views 4 --policy crop:2+flip+mixup:0.4 --amp --device cuda \
  --out $W/c | tail -3
$KD verify-cache $W/c --teacher $W/t.pt --device cuda | tail -3
S="--cache $W/c --student mlp_100 --student cnn_tiny --temperature 4 --alpha 0,0.9 --seed 0 --epochs 6
   --optimizer adamw --val-fraction 0.1 --device cuda --fuse off"
t $KD train-student $S --out $W/r1 | tail -4
t $KD train-student $S --out $W/r1b | tail -1
( $KD train-student $S --checkpoint-every 0.005 --out $W/r2 > $W/kill.log 2>&1 & p=$!; sleep 25; kill -9 $p ) || true
grep -c "checkpoint\|epoch" $W/kill.log || true
ls $W/r2 $W/r2/*/metrics.json 2>/dev/null | head -20 || true
$KD train-student $S --checkpoint-every 0.005 --out $W/r2 | grep -i "resum\|skipped\|written" | head -8
python3 - "$W" <<'PY'
import sys, json, torch, pathlib
w = pathlib.Path(sys.argv[1])
for run in sorted(p.name for p in (w / "r1").iterdir() if (p / "metrics.json").exists()):
    def sd(d): return torch.load(w / d / run / "student.pt", weights_only=True)["state_dict"]
    a, b, c = sd("r1"), sd("r1b"), sd("r2")
    d_rep = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    d_res = max((a[k].float() - c[k].float()).abs().max().item() for k in a)
    m1, m2 = (json.loads((w / d / run / "metrics.json").read_text()) for d in ("r1", "r2"))
    print(f"{run}: max |w| diff, two uninterrupted runs {d_rep:.3g}; uninterrupted vs killed+resumed {d_res:.3g}; "
          f"test top-1 {m1['test_top1']:.4f} vs {m2['test_top1']:.4f}; best epoch {m1.get('best', {}).get('epoch')}"
          f" vs {m2.get('best', {}).get('epoch')}; history equal {m1['history'] == m2['history']}")
PY
t $KD train-student --cache $W/c --student mlp_100 --temperature 2,4 --alpha 0.5,0.9 --epochs 3 --optimizer adamw \
  --device cuda --fuse compile --out $W/r3 | grep -i "fused\|written\|pass of"
run=$(ls $W/r1 | grep -v checkpoints | head -1)
$KD export $W/r1/$run --format pt2 --out $W/m.pt2 | tail -1
$KD export $W/r1/$run --format torchscript --out $W/m.ts | tail -1
