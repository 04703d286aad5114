#!/usr/bin/env bash
# `make toy`: generate ShapeStories and train every toy model on the CPU, with the project's own commands.
#
# Two phases, each running two chains side by side with one CPU thread each (tiny models gain little
# from a second thread); the chains of a phase are balanced to take about the same time:
#   phase 1  captioners: prepare-llava -> pretrain-llava (base from scratch) -> finetune-llava story,
#                        description -> train-text-baseline
#            diffusion:  train-clip -> pretrain-diffusion (VAE + UNet; CLIP's text tower as text encoder)
#   phase 2  StoryGen:   finetune-storygen (context layers on the phase-1 base)
#            the rest:   finetune-storygen (memory attention) -> train-classifier
# Models go to $TOY_MODELS (default models/toy, the shipped ones); data and logs to $TOY_RUNS.
set -euo pipefail

STORYPIPE=${STORYPIPE:-.venv/bin/storypipe}
MODELS=${TOY_MODELS:-models/toy}
RUNS=${TOY_RUNS:-runs/toy}
# TOY_SET: extra config overrides for every command, e.g. TOY_SET="--set toy.stories=100" for a quick run.
read -r -a PRESET <<<"--preset toy ${TOY_SET:-}"
LOGS="$RUNS/logs"
mkdir -p "$MODELS" "$LOGS"
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 HF_HUB_OFFLINE=1
started=$(date +%s)

# stage NAME OUTPUT COMMAND...: run one command, log it to $LOGS/NAME.log, say where it wrote and how long it took.
stage() {
    local name=$1 output=$2 begin
    shift 2
    begin=$(date +%s)
    if ! "$@" >"$LOGS/$name.log" 2>&1; then
        echo "toy: $name FAILED after $(($(date +%s) - begin))s; see $LOGS/$name.log" >&2
        return 1
    fi
    printf 'toy: %-22s %4ds  -> %s\n' "$name" "$(($(date +%s) - begin))" "$output"
}

# A fresh output folder for each trained model (the runs refuse to overwrite a finished one).
fresh() { rm -rf "$@"; }

stage toy-data "$RUNS/data" "$STORYPIPE" toy-data --out "$RUNS/data" "${PRESET[@]}"

captioners() {
    stage prepare-llava "$RUNS/llava-data" "$STORYPIPE" prepare-llava --vist-dir "$RUNS/data" --split train \
        --out "$RUNS/llava-data" "${PRESET[@]}"
    fresh "$MODELS/llava"
    stage pretrain-llava "$MODELS/llava" "$STORYPIPE" pretrain-llava --data "$RUNS/llava-data/caption.json" \
        --images "$RUNS/llava-data/images" --out "$MODELS/llava" "${PRESET[@]}"
    for task in story description; do
        local file=story_next.json
        [ "$task" = description ] && file=description.json
        fresh "$MODELS/llava-$task"
        stage "finetune-llava-$task" "$MODELS/llava-$task" "$STORYPIPE" finetune-llava --task "$task" \
            --data "$RUNS/llava-data/$file" --images "$RUNS/llava-data/images" --out "$MODELS/llava-$task" \
            "${PRESET[@]}" --set "captioner.base_model=$MODELS/llava"
    done
    fresh "$MODELS/text-baseline"
    stage train-text-baseline "$MODELS/text-baseline" "$STORYPIPE" train-text-baseline --data "$RUNS/data" \
        --out "$MODELS/text-baseline" "${PRESET[@]}"
}

diffusion_base() {
    fresh "$MODELS/clip"
    stage train-clip "$MODELS/clip" "$STORYPIPE" train-clip --data "$RUNS/data" --out "$MODELS/clip" "${PRESET[@]}"
    fresh "$RUNS/sd-base"
    stage pretrain-diffusion "$RUNS/sd-base" "$STORYPIPE" pretrain-diffusion --data "$RUNS/data" \
        --out "$RUNS/sd-base" "${PRESET[@]}" --set "generator.tiny.text_encoder=$MODELS/clip"
}

# context_layers KIND OUT: finetune-storygen's context layers (storygen or memory) on the phase-1 base.
context_layers() {
    fresh "$2"
    stage "finetune-storygen-$1" "$2" "$STORYPIPE" finetune-storygen --data "$RUNS/data" --out "$2" \
        "${PRESET[@]}" --set "generator.base_model=$RUNS/sd-base" --set "generator.context=$1"
}

storygen_context() { context_layers storygen "$MODELS/storygen"; }

the_rest() {
    context_layers memory "$MODELS/storygen-memory"
    fresh "$MODELS/classifier"
    stage train-classifier "$MODELS/classifier" "$STORYPIPE" train-classifier --data "$RUNS/data" \
        --out "$MODELS/classifier" "${PRESET[@]}"
}

# side_by_side F G: run two chains at once; fail (after both end) if either failed.
side_by_side() {
    "$1" &
    local first=$! status=0
    "$2" &
    wait "$first" || status=1
    wait $! || status=1
    [ "$status" = 0 ] || { echo "toy: a stage failed (logs in $LOGS)" >&2; exit 1; }
}

side_by_side captioners diffusion_base
side_by_side storygen_context the_rest
rm -rf "$RUNS/sd-base"/checkpoints
du -sh "$MODELS" | sed 's/^/toy: models in all: /'
echo "toy: done in $(($(date +%s) - started))s; try: make demo"
