#!/usr/bin/env bash
# The three studies of docs/results.md ("Table 10 on the built-in data: the runs"), one
# after another, each into results/<study>/ of the current folder: the method comparison
# (24 rows x seeds 0-2), the `digits` ablation (8 rows x seeds 0-2), then the `synthetic`
# ablation (8 rows x seeds 0-4; its UIAT, Grad-CAM, U^2-Net-p and oracle runs of seeds 0-2
# are the comparison's, copied with --reuse). About 30 h on 2 CPU cores; resumable: run it
# again after an interruption and every finished run is reused, an interrupted one resumes.
# Run it from the repository root to add to the records kept in results/ (results/README.md).
#
#   bash benchmarks/study_table10.sh             # dhat-seg on PATH
#   DHAT_SEG="python -m dhat_seg" bash benchmarks/study_table10.sh
#
# Then each table: the same command with --report-only, copied to docs/tables/<study>/.
set -euo pipefail
read -r -a DHAT_SEG <<< "${DHAT_SEG:-dhat-seg}"
ROWS='-,gradcam,ig,u2net,oracle,oracle[dilate=1],oracle[dilate=2],oracle[dilate=4]'
METHODS='standard,at,trades,mart,awp,trades-awp,uiat,dhat,dhat[attention=u2net],dhat[attention=oracle],dhat-awp,'
METHODS+='dhat-trades,dhat-mart,sglr,cfa,dhat-cfa,fsr,fsr-trades,fsr-mart,part,part-t,part-m,again,again-code'
COMMON=(--preset quick --jobs 2 --cache-dir runs/table10-cache)

"${DHAT_SEG[@]}" compare "${COMMON[@]}" --methods "$METHODS" --seeds 0,1,2 --out results/compare-synthetic
"${DHAT_SEG[@]}" ablate "${COMMON[@]}" --attention "$ROWS" --set data=digits --seeds 0,1,2 --out results/table10-digits
"${DHAT_SEG[@]}" ablate "${COMMON[@]}" --attention "$ROWS" --seeds 0,1,2,3,4 --out results/table10-synthetic \
    --reuse results/compare-synthetic
