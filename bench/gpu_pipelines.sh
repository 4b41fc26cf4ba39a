#!/usr/bin/env bash
# Full runs of two reference pipelines on one CUDA machine, then `kdpipe compress` on each (issues 10, 14):
# - cifar10-resnet as shipped (tv:resnet50 teacher trained 30 epochs, K = 30, tv:resnet18 KD and scratch,
#   30 epochs), on the GPU, with CIFAR-10 from an ImageFolder tarball;
# - the default pipeline, on this host's CPU (as `make all` runs it on a machine without a GPU), at the same
#   time, with KDPIPE_THREADS CPU threads;
# then compress of each (pruned models fine-tuned on the GPU; accuracy and latency measured on the CPU, the
# default's while the GPU pipeline still runs, cifar10-resnet's alone).
# Prints each step's wall time; copies tables, reports and logs to OUTDIR.
# Usage (repository root, kdpipe installed): bash bench/gpu_pipelines.sh CIFAR_TARBALL FMNIST_DIR OUTDIR
# Quick check on a CPU (a small ImageFolder tarball; the dump's probe forced): LIMIT=2000 EPOCHS=2 DEVICE=cpu bash bench/gpu_pipelines.sh ...
set -euo pipefail
TAR=${1:?give the CIFAR-10 ImageFolder tarball}; FM=${2:?give the folder of the Fashion-MNIST IDX files}
OUT=${3:?give the output folder}
LIMIT=${LIMIT:-}; EPOCHS=${EPOCHS:-}; DEVICE=${DEVICE:-cuda}; THREADS=${THREADS:-8}
W=.dev/gpu-pipelines; mkdir -p "$W" "$OUT" .venv; touch .venv/.kdpipe-setup
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'no GPU'); import os; print('cpus', os.cpu_count())"
lscpu | grep -m1 "Model name" || true
t0=$(date +%s)
collect() {  # what a run has written so far, into OUT (called after each stage: a time-out keeps the earlier ones)
  for p in default cifar10-resnet; do
    mkdir -p "$OUT/$p"
    cp runs/$p/report/report.md runs/$p/report/*.png "$OUT/$p/" 2>/dev/null || true
    cp runs/$p/compress/compress.md runs/$p/compress/compress.json runs/$p/compress/compress.png "$OUT/$p/" 2>/dev/null || true
    for m in runs/$p/students/*/metrics.json; do [ -f "$m" ] && cp "$m" "$OUT/$p/$(basename "$(dirname "$m")").metrics.json"; done
  done
}
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; collect; }
[ -d "$W/cifar10" ] || tar -xJf "$TAR" -C "$W"
stamp "extracted CIFAR-10"

# The pipelines as shipped, with only the data location (and, for a quick check, limit/epochs) changed.
sed -e "s|^spec = \"cifar10\"|spec = \"imagefolder:$W/cifar10\"|" pipelines/cifar10-resnet.toml > "$W/cifar10-resnet.toml"
sed -e "s|^spec = \"fashion-mnist\".*|&\nroot = \"$FM\"|" pipelines/default.toml > "$W/default.toml"
for f in "$W/cifar10-resnet.toml" "$W/default.toml"; do
  [ -z "$LIMIT" ] || sed -i "s|^\[data\]|[data]\nlimit = $LIMIT|; s|^\[dump\]|[dump]\nforce = true|" "$f"
  [ -z "$LIMIT" ] || sed -i "s|^logits_dtype = \"float16\"|logits_dtype = \"float32\"|" "$f"
  [ -z "$EPOCHS" ] || sed -i -E "s#^(epochs|views) = [0-9]+#\1 = $EPOCHS#" "$f"
done
grep -q '^spec = "imagefolder:' "$W/cifar10-resnet.toml" && grep -q "^root = \"$FM\"" "$W/default.toml"

CMP="--finetune-epochs 1 --repeats 20 --device $DEVICE"
FT=${FT_SAMPLES:+--finetune-samples $FT_SAMPLES}
default_job() {  # on the CPU (as make all runs without a GPU); then its compress, fine-tuning on DEVICE
  if CUDA_VISIBLE_DEVICES= KDPIPE_THREADS=$THREADS make pipeline PIPELINE="$W/default.toml" KDPIPE=kdpipe \
      > "$OUT/default-pipeline.log" 2>&1; then stamp "default pipeline done"; else stamp "default pipeline FAILED"; return; fi
  KDPIPE_THREADS=$THREADS kdpipe compress --teacher runs/default/teacher.pt --data fashion-mnist --data-root "$FM" \
    ${LIMIT:+--limit $LIMIT} --students runs/default/students $CMP $FT --out runs/default/compress \
    > "$OUT/default-compress.log" 2>&1 && stamp "default compress done" || stamp "default compress FAILED"
}
default_job > "$OUT/default-job.log" 2>&1 &
bg=$!
make pipeline PIPELINE="$W/cifar10-resnet.toml" KDPIPE=kdpipe 2>&1 | tee "$OUT/cifar10-resnet-pipeline.log" \
  | grep -E "^kdpipe|epoch [0-9]+/[0-9]+.*(done|top-1)|written|teacher|report" | tail -40
stamp "cifar10-resnet pipeline done"
wait $bg; cat "$OUT/default-job.log"
KDPIPE_THREADS=$THREADS kdpipe compress --teacher runs/cifar10-resnet/teacher.pt --data "imagefolder:$W/cifar10" \
  ${LIMIT:+--limit $LIMIT} --students runs/cifar10-resnet/students $CMP $FT --out runs/cifar10-resnet/compress \
  > "$OUT/cifar10-resnet-compress.log" 2>&1
stamp "cifar10-resnet compress done"

cat "$OUT/cifar10-resnet/compress.md" | head -30
