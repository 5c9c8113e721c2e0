#!/usr/bin/env bash
# GPU check of vlmspec on a CUDA machine with torch and transformers preinstalled and no package registry.
# Runs from the source tree (PYTHONPATH=src, nothing installed), TF32 off so fp32 comparisons are exact:
#   1. the greedy-equality tests (tests/test_equality.py; they run on the CPU, fp32) when pytest is present;
#   2. greedy equality on cuda: every vision family × every registered drafter, fp32, against model.generate;
#   3. a short bf16 bench of the testbed on cuda: prints c(k)/c(1) and the speedups (report in OUT/bench).
# The testbed is the shipped model; if its weights are missing, a random-init model of the same architecture
# stands in (timings and c(k) are real, acceptance and speedups of a random model are not), and it says so.
#
# usage: scripts/gpu_check.sh [OUT]       OUT defaults to runs/gpu-check
# env:   PYTHON (default python), LIMIT (samples per suite, default 4), MAX_NEW_TOKENS (default 64),
#        EQUALITY_TIMEOUT (seconds for step 1, default 300), SKIP_PYTEST=1 (skip step 1 when device time is short),
#        DEVICE (default cuda; DEVICE=cpu dry-runs the script itself on a machine without a GPU)
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
OUT=$(mkdir -p "${1:-$ROOT/runs/gpu-check}" && cd "${1:-$ROOT/runs/gpu-check}" && pwd)
PY=${PYTHON:-python}
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export NVIDIA_TF32_OVERRIDE=0          # cuBLAS/cuDNN: no TF32 anywhere in this process tree
export VLMSPEC_CACHE="$OUT/cache"      # generated suites
export LIMIT=${LIMIT:-4} MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-64} DEVICE=${DEVICE:-cuda} OUT
cd "$ROOT"
status=0

echo "== environment"
$PY - <<'PY' || exit 1
import platform, torch, transformers
print(f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")
import os
if os.environ["DEVICE"] != "cpu":
    if not torch.cuda.is_available():
        raise SystemExit("CUDA is not available: this script is for a CUDA machine (DEVICE=cpu for a dry run)")
    print(f"cuda {torch.version.cuda}, device {torch.cuda.get_device_name(0)}")
import vlmspec
print(f"vlmspec {vlmspec.__version__} from {vlmspec.__file__}")
PY

echo; echo "== 1. greedy-equality tests (tests/test_equality.py, fp32)"
if [ "${SKIP_PYTEST:-0}" = 1 ]; then
    echo "skipped (SKIP_PYTEST=1)"
elif $PY -c "import pytest" 2>/dev/null; then
    timeout "${EQUALITY_TIMEOUT:-300}" $PY -m pytest tests/test_equality.py -q -x -p no:cacheprovider || status=1
else
    echo "pytest is not installed here: skipped (step 2 checks equality on cuda without it)"
fi

echo; echo "== 2. greedy equality on $DEVICE (fp32, TF32 off)"
$PY - <<'PY' || status=1
import os, random, tempfile
from pathlib import Path
import torch
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
from vlmspec import Generator, Target, TreeConfig, available_drafters, build_drafter
from vlmspec.testing import FAMILIES, compare_greedy, random_image, save_tiny_model

WORDS = "the cat sat on a red mat what color is it describe image two blue circles".split()
TREES = [TreeConfig("chain", depth=4), TreeConfig("dynamic", depth=4, topk=3, total_tokens=10)]
failed = 0
for family in [f for f in FAMILIES if f != "llama"]:
    try:
        directory = save_tiny_model(Path(tempfile.mkdtemp()) / family, family, lm_head_scale=8.0,
                                    attention_scale=4.0)
        target = Target.from_pretrained(directory, dtype=torch.float32)
        target.model.to(os.environ["DEVICE"])
    except Exception as error:  # an architecture this transformers version lacks
        print(f"{family:14s} skipped: {type(error).__name__}: {error}")
        continue
    counts = {"equal": 0, "near-tie": 0, "different": 0}
    for name in available_drafters():
        options = {"model": str(directory)} if name == "draft-model" else {}
        try:
            drafter = build_drafter(name, target, seed=1, **options)
        except Exception as error:
            print(f"{family:14s} {name}: cannot build: {type(error).__name__}: {error}")
            failed += 1
            continue
        for index in range(4):
            rng = random.Random(index)
            images = [random_image(rng)]
            prompt = "<image> " + " ".join(rng.choice(WORDS) for _ in range(5))
            inputs = target.encode(images, prompt=prompt)
            with torch.no_grad():
                reference = target.model.generate(**inputs, do_sample=False, max_new_tokens=12)
            reference = reference[0, inputs["input_ids"].shape[1]:].tolist()
            for tree in TREES:
                ours = Generator(target, drafter, tree).generate(images, prompt=prompt, max_new_tokens=12).token_ids
                outcome = compare_greedy(target.model, inputs, ours, reference)
                counts[outcome] += 1
                if outcome == "different":
                    print(f"  DIFFERENT {family} {name} {tree.kind}: {ours} vs {reference}")
    total = sum(counts.values())
    bad = counts["different"] > 0 or counts["near-tie"] > 0.05 * total
    failed += bad
    print(f"{family:14s} {counts}  {'FAIL' if bad else 'ok'}")
raise SystemExit(1 if failed else 0)
PY

echo; echo "== 3. bf16 bench of the testbed on $DEVICE"
$PY - <<'PY' || status=1
import json, os
from pathlib import Path
import torch
from vlmspec import available_drafters
from vlmspec.bench.report import across_table, costs_table
from vlmspec.bench.runner import BenchConfig, run_bench
from vlmspec.demo import shipped_drafters
from vlmspec.testbed import shipped_path

out = Path(os.environ["OUT"])
try:
    target, label = str(shipped_path()), "the shipped testbed"
except ValueError:
    from vlmspec.testbed.model import ArchConfig, build_model, build_processor, corpus, train_tokenizer
    target = out / "testbed-standin"
    tokenizer = train_tokenizer(ArchConfig().vocab_size, corpus(n=1000))
    build_model(ArchConfig(), tokenizer).to(torch.bfloat16).save_pretrained(target)
    build_processor(tokenizer).save_pretrained(target)
    target, label = str(target), "a RANDOM-INIT stand-in of the testbed architecture (shipped weights missing)"
shipped = shipped_drafters() if "RANDOM" not in label else []
drafters = ("none", *shipped, *[d for d in ("eagle", "prompt-lookup") if d in available_drafters()])
print(f"target: {label}; drafters: {', '.join(drafters)}", flush=True)
config = BenchConfig(target=target, drafters=drafters, suites=("describe", "vqa", "ocr"), temperatures=(0.0, 1.0),
                     max_new_tokens=int(os.environ["MAX_NEW_TOKENS"]), dtype="bf16", device=os.environ["DEVICE"],
                     out=str(out / "bench"), limit=int(os.environ["LIMIT"]), warmup=2, cost_repeats=10,
                     plots=False)
if (out / "bench" / "records.jsonl").exists():
    (out / "bench" / "records.jsonl").unlink()
run_bench(config, progress=False)
summary = json.loads((out / "bench" / "summary.json").read_text())
print("\nc(k)/c(1), bf16 on", summary["machine"]["device_name"])
print(costs_table(summary))
print("\nspeedups (geometric mean over suites)")
print(across_table(summary))
print(f"\nfull report: {out / 'bench' / 'report.md'}")
PY

echo; [ $status -eq 0 ] && echo "gpu_check: all steps passed" || echo "gpu_check: some step FAILED (see above)"
exit $status
