#!/usr/bin/env bash
# Build reader stand-ins on one lent GPU (issue 26): each build times its letter steps and runs what fits in
# SECONDS_BUDGET. Used through the device tool: run(command="bash bench/gpu_build_readers.sh q25_h128").
# One build at a time is fastest: four at once on one H100 ran 380 ms a step each (the tiny models are
# launch-bound, and separate processes time-slice the GPU), so each fitted only ~250 letter steps in 470 s.
# Writes each model folder and its log under $OUT (default runs/gpu_readers).
set -u
OUT=${OUT:-runs/gpu_readers}
SECONDS_BUDGET=${SECONDS_BUDGET:-480}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader > "$OUT/card.txt" 2>&1
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" >> "$OUT/card.txt"
# The evaluation competition first: every build measures its reading on it.
python3 -c "from mcvqa.demo.reader_data import generate_reader_dataset as g; g('runs/reader_data')"
build() {  # name, then build_reader.py arguments
    local name=$1; shift
    python3 bench/build_reader.py --device cuda --seconds "$SECONDS_BUDGET" --threads 4 --data runs/reader_data \
        --pretrain-data "runs/pretrain_$name" --out "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
    echo "$name rc $?" >> "$OUT/card.txt"
    # One file per model: the device tool brings back only a few files per call.
    tar -cf "$OUT/$name.tar" -C "$OUT" "$name" && rm -rf "${OUT:?}/$name"
}
COMMON="--pretrain-rows 16000 --batch-size 64 --steps 40000 --warmup-epochs 1"
LOOKUP="--pretrain-rows 16000 --batch-size 128 --steps 40000 --warmup-epochs 1 --question-types colour,shape,count,position,category,word,lookup"
for name in "${@:-q25_h128}"; do
    case $name in
        q25_h128) build q25_h128 --family qwen2_5_vl --hidden-size 128 --learning-rate 0.002 $COMMON ;;
        q25_h256) build q25_h256 --family qwen2_5_vl --hidden-size 256 --learning-rate 0.001 $COMMON ;;
        q35_h128) build q35_h128 --family qwen3_5 --hidden-size 128 --learning-rate 0.002 $COMMON ;;
        q35_h256) build q35_h256 --family qwen3_5 --hidden-size 256 --learning-rate 0.001 $COMMON ;;
        # Continues q25_h128 (carried in runs/gpu_init): options in random orders first, the prior at the end.
        q25_cont) build q25_cont --family qwen2_5_vl --hidden-size 128 --learning-rate 0.002 --pretrain-rows 12000 \
            --batch-size 64 --steps 40000 --uniform-fraction 0.75 --init-from runs/gpu_init/q25_h128 ;;
        # Issue 26, runs 50+: lr 5e-4 with the lookup rows (at 2e-3 not even the lookup is learned); batch 128 costs
        # a launch-bound GPU about what 64 does.
        q25_lookup) build q25_lookup --family qwen2_5_vl --hidden-size 128 --learning-rate 0.0005 $LOOKUP ;;
        q35_lookup) build q35_lookup --family qwen3_5 --hidden-size 128 --learning-rate 0.0005 $LOOKUP ;;
        # Continues run 50 (the CPU build above at 5,000 steps, carried in runs/gpu_init/run50) on new rows.
        q25_lookup_cont) build q25_lookup_cont --family qwen2_5_vl --hidden-size 128 --learning-rate 0.0005 --seed 2 \
            --init-from runs/gpu_init/run50 $LOOKUP ;;
        # Continues q25_lookup_cont (carried in runs/gpu_init/lookup_cont) on another 16,000 new rows.
        q25_lookup_cont2) build q25_lookup_cont2 --family qwen2_5_vl --hidden-size 128 --learning-rate 0.0005 --seed 3 \
            --init-from runs/gpu_init/lookup_cont $LOOKUP ;;
        # Issue 26, run 63: continues run 61 (a CPU Qwen3.5 build with attention first and last, carried in
        # runs/gpu_init/q35_attn) on 16,000 new rows: the committed data/reader_model/qwen3_5.
        q35_attn_cont) build q35_attn_cont --family qwen3_5 --hidden-size 128 --learning-rate 0.0005 --seed 2 \
            --init-from runs/gpu_init/q35_attn $LOOKUP ;;
        *) echo "unknown build $name" >&2; exit 2 ;;
    esac
done
cat "$OUT/card.txt"
for f in "$OUT"/*.log; do echo "== $f"; tr '\r' '\n' < "$f" | grep -v "it/s\|Warn\|warn" | grep -v "^ *$" | tail -40; done
