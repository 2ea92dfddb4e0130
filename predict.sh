#!/bin/sh
# The CVPR 2025 interactive 3D challenge runs `sh predict.sh` in /workspace of the submitted container, once per
# interaction step (the box, then each of 5 clicks), with the cases in /workspace/inputs and the predictions
# expected in /workspace/outputs (<same name>.npz, key segs). Extra arguments go to the command (--device ...).
#
# Each step is a fresh container (docker run --rm), so the embedding cache lives in the mounted outputs folder,
# which persists between the steps of a case (the evaluator reads only <case>.npz there); set
# SEGMENTWITHSAM_EMBEDDING_CACHE to keep it elsewhere.
set -e
here=$(cd "$(dirname "$0")" && pwd)
command=segmentwithsam
if [ -x "$here/.venv/bin/segmentwithsam" ]; then command="$here/.venv/bin/segmentwithsam"; fi
inputs=${SEGMENTWITHSAM_INPUTS:-/workspace/inputs}
outputs=${SEGMENTWITHSAM_OUTPUTS:-/workspace/outputs}
export SEGMENTWITHSAM_EMBEDDING_CACHE="${SEGMENTWITHSAM_EMBEDDING_CACHE:-$outputs/.segmentwithsam-embeddings}"
exec "$command" cvpr25 "$inputs" "$outputs" "$@"
