#!/usr/bin/env bash
# Every visual-token method on digits-vlm at the same equivalent tokens (T_eq, METHODS.md E4), one table.
#
# Pre-LLM methods keep T tokens (every LLM layer sees T); in-LLM methods solve equivalent_tokens=T into
# their schedules. On this 4-layer decoder FastV and DART cut at layer 1 (the papers' K=2 is for 32 layers
# and leaves T_eq >= 128 here) and FiCoCo-L starts at layer 0; FiCoCo-VL's vision stage keeps 1.5 T.
# Budgets a method cannot reach are printed as "skipped" with the reachable range.
# Usage: benchmarks/digits_vlm_equivalent_tokens.sh [OUT_DIR]   (about 25 min on 2 idle cores)
set -euo pipefail
out=${1:-digits_vlm_results}
mkdir -p "$out"
bench() { tokenreduce bench zoo:digits-vlm --samples 300 --batch-size 50 --repeats 1 --warmup 0 --no-progress "$@"; }
pre="tome evit ficoco_v random uniform pooling fastervlm visionzip divprune vispruner prumerge prumerge_plus cdpruner"
bench --method $pre --equivalent-tokens 128 96 64 26 --out "$out/pre_llm.json"
bench --method fastv dart pdrop sparsevlm ficoco_l --equivalent-tokens 192 128 96 64 26 \
  --set fastv.layer=1 --set dart.layer=1 --set ficoco_l.start_layer=0 --out "$out/in_llm.json"
bench --method sparsevlm --set sparsevlm.mode=v2 --equivalent-tokens 128 96 --out "$out/v2.json"
for pair in 192:128 144:96 96:64 39:26; do
  bench --method ficoco_vl --set ficoco_vl.vision.keep="${pair%%:*}" --set ficoco_vl.language.start_layer=0 \
    --equivalent-tokens "${pair##*:}" --out "$out/ficoco_vl_${pair##*:}.json"
done
tokenreduce compare "$out"/pre_llm.json "$out"/in_llm.json "$out"/v2.json "$out"/ficoco_vl_*.json
