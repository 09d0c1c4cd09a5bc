#!/usr/bin/env bash
# Download the small peer wheels that the GPU machine (device tool, kind nvidia-h200: Python 3.12, no
# internet) lacks, into .whl/ (git-ignored) for carrying, check that what travels stays under the device
# tool's 64 MiB, and print the exact `run` call of the GPU check (docs/gpu-check.md).
#
#   tools/fetch_gpu_wheels.sh            # download, check sizes, print the run call
#   PYTHON=/path/to/python tools/fetch_gpu_wheels.sh
#
# The peers: open_clip_torch (ClipLoss), inf-cl (Inf-CL), liger-kernel (fused linear cross-entropy),
# cut-cross-entropy, and the small dependencies the GPU machine does not have (ftfy and its wcwidth, for
# open_clip's tokenizer import). Everything else they need is already there (torch, torchvision, triton,
# numpy, regex, tqdm, huggingface-hub, safetensors, timm: the device notes' package list, KINDS.md).
# Versions are pinned so that every session carries the same code.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
cd "$repo"
PY="${PYTHON:-python3}"
DEST=.whl
LIMIT_MIB=64          # the device tool: working tree + carried paths, per call
WHEEL_BUDGET_MIB=16   # what the wheels may take of it

PEERS=(open_clip_torch==3.3.0 inf-cl==1.2.1 liger-kernel==0.8.5 cut-cross-entropy==25.1.1)
DEPS=(ftfy==6.3.1 wcwidth==0.9.4)
# distributions already on the GPU machine (KINDS.md, 'Python packages already there', read 2026-11-17),
# used only to report requirements that are neither carried nor there
THERE="torch torchvision triton numpy regex tqdm huggingface-hub safetensors timm transformers packaging"

if ! git check-ignore -q "$DEST/x.whl" 2>/dev/null; then
  echo "error: $DEST/ is not git-ignored here; add '/$DEST/' to .gitignore or .git/info/exclude first" >&2
  exit 1
fi
mkdir -p "$DEST"
rm -f "$DEST"/*.whl

# the device notes' platform list for manylinux x86_64 wheels, CPython 3.12
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${PEERS[@]}" "${DEPS[@]}"

echo "wheels in $DEST/:"
total=0
for w in "$DEST"/*.whl; do
  sz=$(stat -c %s "$w")
  total=$((total + sz))
  printf '  %8.1f KiB  %s\n' "$(echo "$sz / 1024" | bc -l)" "$(basename "$w")"
done
printf '  total %.2f MiB\n' "$(echo "$total / 1048576" | bc -l)"

# requirements of the carried wheels that are neither carried nor on the GPU machine
carried=" "
for w in "$DEST"/*.whl; do
  n=$(basename "$w" | cut -d- -f1 | tr '_' '-' | tr 'A-Z' 'a-z')
  carried+="$n "
done
missing=""
for w in "$DEST"/*.whl; do
  while read -r req; do
    name=$(echo "$req" | sed -E 's/^Requires-Dist: *([A-Za-z0-9_.-]+).*/\1/' | tr '_' '-' | tr 'A-Z' 'a-z')
    case " $THERE " in *" $name "*) continue ;; esac
    case "$carried" in *" $name "*) continue ;; esac
    missing+=" $name($(basename "$w" | cut -d- -f1))"
  done < <(unzip -p "$w" '*.dist-info/METADATA' | grep '^Requires-Dist' | grep -v 'extra ==' || true)
done
if [ -n "$missing" ]; then
  echo "warning: requirements neither carried nor listed as present on the GPU machine:$missing" >&2
fi

# what travels: tracked files + untracked files git does not ignore + the carried .whl/
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 -r stat -c %s 2>/dev/null | awk '{s+=$1} END {print s+0}')
all=$((tree + total))
printf 'travels: working tree %.2f MiB + wheels %.2f MiB = %.2f MiB (limit %d MiB)\n' \
  "$(echo "$tree / 1048576" | bc -l)" "$(echo "$total / 1048576" | bc -l)" "$(echo "$all / 1048576" | bc -l)" "$LIMIT_MIB"
if [ "$total" -gt $((WHEEL_BUDGET_MIB * 1048576)) ] || [ "$all" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "error: too large to carry" >&2
  exit 1
fi

commit=$(git rev-parse HEAD 2>/dev/null || echo unknown)
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then
  echo "note: the working tree has uncommitted changes; the check will run them, recorded as commit $commit" >&2
fi
cat <<EOF

The device tool call for the GPU check (one call, ~8 min; the check's own budgets end it by 465 s):
  run(
    command: "python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; GKCORE_COMMIT=$commit python3 benchmarks/gpu_check.py",
    carry: [".whl"],
    timeout_s: 540
  )
Results come back in \$OUT: gpu_check.json, gpu_check.md, gpu_check.log, build.log, bench.json.
EOF
