#!/usr/bin/env bash
# The GPU figures of issues 14 and 18, in one prepared call of the device tool (not run on a GPU yet).
#
# The device machine has PyTorch but neither poisonlab's other requirements nor any dataset, cannot
# fetch, and takes at most 64 MiB per call; CIFAR-10 does not fit in one call (benchmarks/device_data.py).
# Here, once (.device-data/ is git-ignored, so it travels only where carry names it):
#   python benchmarks/device_data.py pack --data-dir ../shared/data --out .device-data
#   pip download -q --python-version 3.12 --platform manylinux2014_x86_64 --only-binary=:all: --no-deps \
#       -d .device-data/wheels $(pip freeze | grep -iE '^(pydantic|pydantic.core|annotated.types|typing.inspection|typing.extensions|cleanlab|termcolor)==')
#   (the venv's own versions, which agree with each other; the machine's Python is 3.12)
# Then device calls, back to back (the machine goes back after 30 s idle; ignored files stay while it is warm):
#   run(command="ls .device-data", carry=[".device-data/p0"])
#   run(command="ls .device-data", carry=[".device-data/p1"])
#   run(command="bash benchmarks/gpu_figures.sh", carry=[".device-data/p2", ".device-data/wheels"], timeout_s=600)
# Figures come back under $OUT (at most 8 files): tta94_gpu_s{0,1,2}.json, preact18_gpu.json, gpu_figures.log.
# PREACT_EPOCHS (default 100, BackdoorBench's) and PREACT_S (its time limit, default 360 s) fit it to the
# device time left; a PreAct-ResNet18 stopped by its limit leaves its per-epoch rows in the log only.
set -uo pipefail
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
LOG="$OUT/gpu_figures.log"
export PYTHONPATH=src PYTHONUNBUFFERED=1
{
  date -u
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  python3 -m pip install -q --no-index --find-links .device-data/wheels pydantic cleanlab
  python3 benchmarks/device_data.py unpack --src .device-data --dest .device-data/data || exit 1
} 2>&1 | tee "$LOG"
[[ -d .device-data/data/cifar-10-batches-py ]] || { echo "CIFAR-10 was not unpacked: see $LOG"; exit 1; }
D=.device-data/data
for s in 0 1 2; do  # issue 14: time to 94% with the default recipe (airnet + airbench94)
  timeout 150 python3 benchmarks/time_to_accuracy.py --data-dir "$D" --target 0.94 --seed "$s" \
    --out "$OUT/tta94_gpu_s$s.json" 2>&1 | grep -v '^ ' | tee -a "$LOG"
done
# issue 14 item 5 and issue 18: PreAct-ResNet18 with BackdoorBench's clean recipe (SGD 0.01, cosine, batch 128)
timeout "${PREACT_S:-360}" python3 benchmarks/time_to_accuracy.py --data-dir "$D" --preset none \
  --model preact_resnet18 --epochs "${PREACT_EPOCHS:-100}" --set batch_size=128 --set lr=0.01 \
  --set 'schedule="cosine"' --target 0.92 --out "$OUT/preact18_gpu.json" 2>&1 | grep -v '^ ' | tee -a "$LOG"
date -u | tee -a "$LOG"
