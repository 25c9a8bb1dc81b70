#!/usr/bin/env bash
# README "Ablations (dev20, through DVC)": the cub chain on dev20 as a DVC pipeline, then one `dvc exp run` per
# arm, each rerunning only the stages its change reaches (DVC's run cache restores the rest), and the table from
# `dvc exp show`. Runs in a fresh clone of this repository so that this checkout's params, dvc.lock and metrics stay
# as they are.
#
#   bench/dev20_ablation_dvc.sh [CLONE] [ARM...]      # default CLONE /tmp/fgpipe-dev20-ablation, every arm below
#   bench/dev20_ablation_dvc.sh /tmp/abl lcam-block   # one arm more in an existing clone
#
# Seed 0 (params.yaml's seeds). The clone's params.yaml runs cub only (`run: {cub: ...}`: its prepare stage watches
# the dev20 root), committed on a branch `ablation-dev20` with the baseline's dvc.lock and metrics. The dev20 root
# is params.yaml's `../shared/...` relative to the clone: a link CLONE/../shared -> this repository's ../shared is
# made when absent. About 33 min for the baseline and each LCAM arm, 17 for a heatmap-method arm, 1 for the
# joint without parts, on 2 quiet cores: run nothing else with torch meanwhile (two torch jobs on 2 cores run
# 10x slower, not 2x).
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
CLONE="${1:-/tmp/fgpipe-dev20-ablation}"
shift || true
ARMS=("$@")
[ ${#ARMS[@]} -gt 0 ] || ARMS=(noparts crops-aolm lcam-stage lcam-block crops-gradcam crops-bap)
declare -A SET=(
  [noparts]="-S evaluate.branches=[raw,object]"
  [nocalibrate]="-S evaluate.calibrate=false"
  [crops-aolm]="-S attention.method=aolm"
  [crops-gradcam]="-S attention.method=gradcam"
  [crops-bap]="-S attention.method=bap"
  [lcam-stage]="-S per_dataset.cub.model.lcam=stage"
  [lcam-block]="-S per_dataset.cub.model.lcam=block"
)
t() { local s; s=$(date +%s); echo "START $(date -u +%T): $*"; "$@"; echo "ELAPSED $(( $(date +%s) - s )) s: $*"; }
git_() { git -c user.name=fgpipe -c user.email=fgpipe@localhost "$@"; }

if [ ! -d "$CLONE/.git" ]; then
  git clone -q "$REPO" "$CLONE"
  [ -e "$CLONE/../shared" ] || ln -s "$(cd "$REPO/../shared" && pwd)" "$CLONE/../shared"
  cd "$CLONE"
  git checkout -q -b ablation-dev20
  python3 - <<'PY'
import re
text = open("params.yaml").read()
text, n = re.subn(r"(?m)^  synthetic: fgpipe/datasets/synthetic.py\n  # cub: ", "  # synthetic: fgpipe/datasets/synthetic.py\n  cub: ", text)
assert n == 1, "params.yaml: `run` is not the synthetic entry followed by the commented cub one"
open("params.yaml", "w").write(text)
PY
  git_ commit -qam "dev20 ablation: run the cub chain only"
  uv sync --all-groups -q
fi
cd "$CLONE"
export PATH="$CLONE/.venv/bin:$PATH"
if ! git log -1 --format=%s | grep -q "baseline through DVC"; then
  t dvc repro
  git add dvc.lock metrics && git_ commit -qm "dev20 seed 0 baseline through DVC (dvc repro)"
fi
for arm in "${ARMS[@]}"; do
  [ -n "${SET[$arm]:-}" ] || { echo "unknown arm $arm (known: ${!SET[*]})" >&2; exit 2; }
  # each arm from the baseline's params: `dvc exp run` leaves the last experiment's params.yaml in the workspace,
  # and the next one would build on it (from HEAD, not the index: an interrupted `dvc exp run` leaves its params
  # staged). An arm run before is replaced.
  git checkout -q HEAD -- params.yaml dvc.lock
  dvc exp remove -q "$arm" 2>/dev/null || true
  # shellcheck disable=SC2086
  t dvc exp run -n "$arm" ${SET[$arm]}
done
git checkout -q HEAD -- params.yaml dvc.lock
# README's table: the arms' params and the test figures (every choice behind them made on train/val)
dvc exp show --md --no-pager --drop '.*' --keep \
  'Experiment|^(raw|object|parts|joint).top1$|^weights|.*extract_crops.json:localization.accuracy|attention.method|per_dataset.cub.model.lcam|evaluate.branches'
