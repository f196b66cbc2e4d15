#!/usr/bin/env bash
# On a machine with a CUDA GPU: install what is missing, run the CUDA-marked tests and every
# benchmark on the GPU, each under its own time limit (7.9 minutes in all at most), and print one
# table with each step's status, time and headline figures (the ratios against TransformerLens
# and sae-lens).
#
#   bash benchmarks/gpu_check.sh                 # from the repository root
#   bash benchmarks/gpu_check.sh --dry-run       # on CPU, tiny settings, no installs
#   STEPS="tests speed" bash benchmarks/gpu_check.sh   # some steps only
#
# Environment: PYTHON (default .venv/bin/python, else python3), STEPS (default all), LIMIT_<STEP>
# (seconds, e.g. LIMIT_SPEED=200), TORCH_INDEX (the CUDA wheel index for torch).
set -euo pipefail

cd "$(dirname "$0")/.."
DRY=0
if [[ "${1:-}" == "--dry-run" ]]; then DRY=1; fi
PYTHON="${PYTHON:-}"
if [[ -z "$PYTHON" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
LOG_DIR="$(mktemp -d)"
ALL_STEPS="tests patching speed attribution inputs sae analysis load"
STEPS="${STEPS:-$ALL_STEPS}"
TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cu124}"

say() { printf '[gpu_check] %s\n' "$*" >&2; }

has_cuda() { "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)'; }

# ------------------------------------------------------------------------------ set-up
if [[ $DRY == 1 ]]; then
    DEVICE=cpu
    say "dry run: CPU, tiny settings, no installs; logs in $LOG_DIR"
else
    if ! command -v nvidia-smi >/dev/null 2>&1 || ! nvidia-smi -L >/dev/null 2>&1; then
        say "no NVIDIA GPU found (nvidia-smi); use --dry-run on a CPU machine"
        exit 2
    fi
    nvidia-smi -L >&2
    if ! "$PYTHON" -c 'import mechkit' >/dev/null 2>&1; then
        say "installing mechkit (editable) and its dependencies"
        timeout 300 "$PYTHON" -m pip install -q -e . || { say "pip install -e . failed"; exit 3; }
    fi
    if ! has_cuda; then
        say "the installed torch has no CUDA: installing a CUDA build from $TORCH_INDEX"
        timeout 400 "$PYTHON" -m pip install -q --upgrade torch --index-url "$TORCH_INDEX" \
            || { say "could not install a CUDA torch (offline? set TORCH_INDEX)"; exit 3; }
        has_cuda || { say "torch still sees no CUDA device"; exit 3; }
    fi
    for pkg in pytest transformer_lens sae_lens captum; do
        if ! "$PYTHON" -c "import $pkg" >/dev/null 2>&1; then
            say "installing $pkg"
            timeout 200 "$PYTHON" -m pip install -q "${pkg//_/-}" || say "could not install $pkg"
        fi
    done
    DEVICE=cuda
    say "torch $("$PYTHON" -c 'import torch; print(torch.__version__, torch.cuda.get_device_name(0))')"
fi

# ------------------------------------------------------------------------------ steps
# name | limit (s) | command on the GPU | command in a dry run
declare -A LIMIT CMD DRY_CMD
LIMIT[tests]=60
CMD[tests]="$PYTHON -m pytest -m cuda -q -p no:cacheprovider"
DRY_CMD[tests]="$PYTHON -m pytest -m cuda -q -p no:cacheprovider tests/test_cuda.py"
LIMIT[patching]=50
CMD[patching]="$PYTHON benchmarks/patching_speed.py --device cuda --prompts 1 4 16"
DRY_CMD[patching]="$PYTHON benchmarks/patching_speed.py --device cpu --prompts 1"
LIMIT[speed]=100
CMD[speed]="$PYTHON benchmarks/speed_paths.py --device cuda --prompts 8 --patch-prompts 1 4 16"
DRY_CMD[speed]="$PYTHON benchmarks/speed_paths.py --device cpu --tiny"
LIMIT[attribution]=70
CMD[attribution]="$PYTHON -m benchmarks.attribution_speed --device cuda --prompts 8"
DRY_CMD[attribution]="$PYTHON -m benchmarks.attribution_speed --device cpu --prompts 1 --sizes 100"
LIMIT[inputs]=60
CMD[inputs]="$PYTHON benchmarks/input_attribution_speed.py --part speed --device cuda"
DRY_CMD[inputs]="$PYTHON benchmarks/input_attribution_speed.py --part speed --device cpu --methods LIME --samples 10"
LIMIT[sae]=45
CMD[sae]="$PYTHON benchmarks/sae_training_speed.py --device cuda --steps 20 --rounds 3"
DRY_CMD[sae]="$PYTHON benchmarks/sae_training_speed.py --device cpu --steps 2 --rounds 1 --batch 256 --expansion 2"
LIMIT[analysis]=45
CMD[analysis]="$PYTHON benchmarks/analysis_times.py"
DRY_CMD[analysis]="$PYTHON benchmarks/analysis_times.py"
LIMIT[load]=45
CMD[load]="$PYTHON benchmarks/load_times.py"
DRY_CMD[load]="$PYTHON benchmarks/load_times.py"

declare -A STATUS SECONDS_TAKEN
for step in $STEPS; do
    if [[ -z "${LIMIT[$step]:-}" ]]; then say "unknown step $step (steps: $ALL_STEPS)"; exit 2; fi
    var="LIMIT_${step^^}"
    limit="${!var:-${LIMIT[$step]}}"
    if [[ $DRY == 1 && -z "${!var:-}" ]]; then limit=$((limit * 3)); fi  # a CPU, maybe shared
    if [[ $DRY == 1 ]]; then command="${DRY_CMD[$step]}"; else command="${CMD[$step]}"; fi
    say "$step (limit ${limit}s): $command"
    start=$(date +%s)
    set +e
    # shellcheck disable=SC2086  # the command is a word list on purpose
    timeout --kill-after=10 "$limit" $command >"$LOG_DIR/$step.log" 2>&1
    rc=$?
    set -e
    SECONDS_TAKEN[$step]=$(($(date +%s) - start))
    case $rc in
        0) STATUS[$step]=ok ;;
        124 | 137) STATUS[$step]=timeout ;;
        *) STATUS[$step]="failed ($rc)" ;;
    esac
done

# ------------------------------------------------------------------------------ table
# headline lines: ratios, "x faster", test counts
printf '\n%-12s %-11s %6s  %s\n' step status seconds "headline (full logs in $LOG_DIR)"
printf '%s\n' "---------------------------------------------------------------------------------"
for step in $STEPS; do
    first=1
    while IFS= read -r line; do
        if [[ $first == 1 ]]; then
            printf '%-12s %-11s %6s  %s\n' "$step" "${STATUS[$step]}" "${SECONDS_TAKEN[$step]}" "$line"
            first=0
        else
            printf '%-12s %-11s %6s  %s\n' "" "" "" "$line"
        fi
    done < <(grep -E 'ratio|x faster|[0-9]+ (passed|failed|skipped)|Error|error:' \
        "$LOG_DIR/$step.log" | grep -v Warning | cut -c1-150 | head -12 || true)
    if [[ $first == 1 ]]; then
        printf '%-12s %-11s %6s  %s\n' "$step" "${STATUS[$step]}" "${SECONDS_TAKEN[$step]}" \
            "$(tail -n 1 "$LOG_DIR/$step.log" | cut -c1-150)"
    fi
done
failed=0
for step in $STEPS; do [[ ${STATUS[$step]} == ok ]] || failed=1; done
exit $failed
