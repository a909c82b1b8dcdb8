#!/usr/bin/env bash
# Issue 25's GPU checks, made to run in one call of at most 10 minutes on one lent GPU (H100 or H200):
#   the gpu-marked tests, then `bench --profile --device cuda` at the published prior's size (random weights) with
#   each accelerate mode and decoder memory setting, each in its own process (a fresh peak-memory counter, and a
#   hang or crash costs one row only), most important first; a step that would overrun the limit is skipped.
# Usage, from the repository root:  OUT=/some/folder bash Testing/gpu/run_device_checks.sh
# Writes under $OUT: summary.txt (each step, exit code, seconds), env.txt, nvidia-smi.txt, <step>.log,
#   profile-<step>/profile.json, and profile.md (every row in one table: the figures for docs/benchmarks.md).
# Environment: PYTHON (default python), LIMIT_S (default 540: the whole script's wall-clock budget).
set -u
OUT=${OUT:?set OUT to the folder for the results}
PY=${PYTHON:-python}
LIMIT=${LIMIT_S:-540}
mkdir -p "$OUT"
start=$(date +%s)

step() {  # step NAME TIMEOUT_S COMMAND...
  local name=$1 t=$2 left s rc
  shift 2
  left=$(( LIMIT - ($(date +%s) - start) ))
  if [ "$left" -lt 40 ]; then
    echo "skipped $name: only $left s left" | tee -a "$OUT/summary.txt"
    return
  fi
  [ "$t" -gt "$left" ] && t=$left
  s=$(date +%s)
  timeout -k 10 "$t" "$@" > "$OUT/$name.log" 2>&1
  rc=$?
  echo "$name: exit $rc after $(( $(date +%s) - s )) s (limit $t s)" | tee -a "$OUT/summary.txt"
}

profile() {  # profile NAME TIMEOUT_S METHOD [bench options...]
  local name=$1 t=$2 method=$3
  shift 3
  step "$name" "$t" "$PY" -m MRISuperResLib bench --profile --device cuda --methods "$method" \
    --out "$OUT/profile-$name" "$@"
}

{ git rev-parse HEAD 2>/dev/null; "$PY" -c "import torch, monai; print('torch', torch.__version__, 'cuda', \
torch.version.cuda, 'monai', monai.__version__); print(torch.cuda.get_device_name(0))"; } > "$OUT/env.txt" 2>&1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1

# 1. correctness first: every gpu-marked test (captured, nested and channels-last runs equal eager ones on CUDA)
step gpu-tests 180 "$PY" -m pytest Testing -m gpu -q -p no:cacheprovider -rs -k "not compile"
# 2. inversesr-ldm, 46 DDIM steps: eager (the 8.74 s, 18.2 GB baseline) against captured steps, in this run
profile ldm-off 100 inversesr-ldm --accelerate off
profile ldm-cuda-graphs 100 inversesr-ldm --accelerate cuda-graphs
# 3. inversesr-decoder: low-memory GroupNorm (now the default), then with nested checkpointing, channels-last
profile decoder 60 inversesr-decoder
profile decoder-nested 60 inversesr-decoder --profile-set nested_checkpointing=on
profile decoder-channels-last 60 inversesr-decoder --profile-set channels_last=true
# 4. inversesr-ldm with the decoder levers on top of the captured steps
profile ldm-cuda-graphs-nested-cl 100 inversesr-ldm --accelerate cuda-graphs \
  --profile-set nested_checkpointing=on channels_last=true
# 5. compilation last: minutes to compile; what is left of the budget
step gpu-tests-compile 120 "$PY" -m pytest Testing/Python/test_priors_acceleration.py -m gpu -q -p no:cacheprovider \
  -rs -k compile
profile ldm-compile 300 inversesr-ldm --accelerate compile

"$PY" - "$OUT" > "$OUT/profile.md" 2>>"$OUT/summary.txt" <<'PYEOF'
import glob, json, os, sys
from MRISuperResLib.bench.cli import profile_table
rows = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "profile-*", "profile.json")), key=os.path.getmtime):
    rows += json.load(open(path))
print(profile_table(rows))
PYEOF
cat "$OUT/profile.md"
