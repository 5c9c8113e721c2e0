#!/usr/bin/env bash
# Train, tune and benchmark every drafter type on the shipped testbed — the commands behind docs/drafters.md
# ("Trained on the testbed"). Each step resumes when rerun (collect shards, training checkpoints, bench --resume is
# not used: a finished bench folder is skipped). Two lanes of one core each; about 3 hours on the 2-core machine.
#
#   scripts/testbed_drafters.sh data | lane A | lane B | ablate A | ablate B | tune | ablation-eval | heldout | bench
#
# SCALE=N (percent, default 100) scales the main runs' step budgets; REGEN_WITH=DRAFTER (default testbed:eagle)
# writes the regenerated answers by speculative decoding with that drafter, REGEN_WITH= by plain decoding (use it
# when the shipped drafters do not match the shipped testbed, e.g. right after a testbed retrain). Training uses
# bf16 autocast where the CPU computes bf16 natively and fp32 elsewhere (--no-bf16); collect and bench pick their
# dtype the same way (--dtype fast, their default). INIT_FROM=DIR (a folder holding <type>/ drafter checkpoints,
# e.g. a copy of src/vlmspec/testbed/drafters made before shipping new testbed weights) starts each main run from
# that drafter instead of random weights (`vlmspec train --init`): after a short fine-tune of the testbed, a
# continuation at SCALE=30 or so replaces a full retrain.
set -uo pipefail
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
RUNS=${RUNS:-runs/testbed-drafters}
SCALE=${SCALE:-100}
REGEN_WITH=${REGEN_WITH-testbed:eagle}
INIT_FROM=${INIT_FROM:+$(cd "$INIT_FROM" && pwd)}
SCRIPTS=$(cd "$(dirname "$0")" && pwd)
mkdir -p $RUNS && cd $RUNS
DATA="data/regen-describe data/regen-mixed data/ref-describe data/ref-mixed"
MIXED=caption,vqa,ocr,chart,multi_image,text_chat
DRAFTERS="eagle eagle3 msd vispec flash lumen"
NO_BF16=$(python -c "from vlmspec.hardware import native_bf16; print('' if native_bf16() else '--no-bf16')")

train() {  # folder type steps data [extra args...]: one run, batch 8, lr 1e-3
  local out=$1 type=$2 steps=$3 data=$4; shift 4
  [ -f $out/train_config.json ] && return
  [ -n "$INIT_FROM" ] && [ $(dirname $out) = main ] && set -- "$@" --init $INIT_FROM/$type
  echo "$(date +%T) start $out"
  vlmspec train --drafter $type --target testbed --data $data --out $out --steps $steps --batch-size 8 --lr 1e-3 \
      --checkpoint-every 500 --quiet $NO_BF16 "$@"
  echo "$(date +%T) done $out rc=$?"
}

case $1 in
  data)  # training seeds only; reference answers, and the target's own greedy answers (written faster by testbed:eagle)
    for kind in ref regen; do
      flag=""; [ $kind = regen ] && flag="--regenerate${REGEN_WITH:+ --regenerate-with $REGEN_WITH}"
      vlmspec collect --target testbed --suites describe --suite-n 800 $flag --out data/$kind-describe --quiet
      vlmspec collect --target testbed --suites $MIXED --suite-n 300 $flag --out data/$kind-mixed --quiet
    done
    for s in describe:6 text_chat:4 caption:4 multi_image:4; do           # validation suites for tree tuning
      vlmspec testbed data --suite ${s%:*} --n ${s#*:} --seed 1000100 --out val/${s%:*}
    done ;;
  lane)  # the main runs: 20 minutes of one core each, as steps (1200 s / measured s/step at batch 8), x SCALE %
    s() { echo $(( $1 * SCALE / 100 )); }
    case $2 in
      A) train main/eagle eagle $(s 14700) "$DATA" --warmup 100
         train main/msd msd $(s 13450) "$DATA" --warmup 100 --curriculum text-first:$(s 1345),ramp:$(s 1345)
         train main/flash flash $(s 12680) "$DATA" --warmup 100 ;;
      B) train main/eagle3 eagle3 $(s 4250) "$DATA" --warmup 100
         train main/lumen lumen $(s 4090) "$DATA" --warmup 100
         train main/vispec vispec $(s 9080) "$DATA" --warmup 100 ;;
    esac
    [ $2 = B ] && [ ! -f text-assistant/assistant.json ] && \
        python -m vlmspec.bench.assistant --target testbed --out text-assistant --minutes $(( 20 * SCALE / 100 )) ;;
  ablate)  # each comparison: equal steps (0.15 x that design's main budget), same data, batch, lr
    case $2 in
      A) train abl/msd-2stage msd 2018 "$DATA" --warmup 50 --curriculum text-first:200,ramp:200
         train abl/msd-mixed msd 2018 "$DATA" --warmup 50
         train abl/eagle-2stage eagle 2018 "$DATA" --warmup 50 --curriculum text-first:200,ramp:200
         train abl/flash-k2 flash 1902 "$DATA" --warmup 50
         train abl/flash-k1 flash 1902 "$DATA" --warmup 50 --drafter-option tokens_per_forward=1
         train abl/vispec vispec 1362 "$DATA" --warmup 50
         train abl/vispec-nocompress vispec 1362 "$DATA" --warmup 50 --drafter-option compress=false
         train abl/vispec-noglobal vispec 1362 "$DATA" --warmup 50 --drafter-option global_vector=false ;;
      B) train abl/vispec-regen vispec 1362 "data/regen-describe data/regen-mixed" --warmup 50
         train abl/vispec-ref vispec 1362 "data/ref-describe data/ref-mixed" --warmup 50
         train abl/lumen lumen 614 "$DATA" --warmup 50
         train abl/lumen-sampled lumen 614 "$DATA" --warmup 50 --loss sampled_token=true
         train abl/lumen-kv lumen 614 "$DATA" --warmup 50 --loss kv_consistency_weight=0.1
         train abl/lumen-nologit lumen 614 "$DATA" --warmup 50 --loss logit_weight=0
         train abl/lumen-novisual lumen 614 "$DATA" --warmup 50 --drafter-option visual_inputs=false
         train abl/lumen-noglobal lumen 614 "$DATA" --warmup 50 --drafter-option global_vector=false ;;
    esac ;;
  tune)  # every trained drafter under each candidate tree, validation suites, T=0
    arms=none$(printf ",main/%s" $DRAFTERS),draft-model
    # the first line (chain, narrow) won on a 2-core AVX2 CPU in fp32 (docs/drafters.md); not yet tried with bf16
    for tree in kind=chain,depth=5 kind=dynamic,depth=6,topk=2,total=10 kind=dynamic,depth=8,topk=2,total=12 \
                kind=dynamic,depth=5,topk=4,total=16 kind=dynamic,depth=8,topk=6,total=24 \
                kind=dynamic,depth=6,topk=8,total=32 kind=dynamic,depth=10,topk=4,total=40 \
                kind=dynamic,depth=8,topk=8,total=48; do
      out=tune/$(echo $tree | tr ',=' '__'); [ -f $out/summary.json ] && continue; rm -rf $out
      vlmspec bench --target testbed --drafters $arms --suite-file val/describe/suite.jsonl \
          --suite-file val/text_chat/suite.jsonl --suite-file val/caption/suite.jsonl \
          --suite-file val/multi_image/suite.jsonl --temperatures 0 --max-new-tokens 128 --tree $tree --drafter-option draft-model:model=text-assistant \
          --cost-repeats 5 --no-plots --quiet --out $out
    done ;;
  ship)  # the best tree per drafter from `tune` (geometric-mean T=0 speedup on the validation suites), with
         # min_prob=0.02, into the shipped checkpoints (weights, config with that tree, training settings)
    python - "$DRAFTERS" <<'PY'
import json, shutil, sys
from pathlib import Path
from vlmspec.testbed import SHIPPED_DRAFTERS_DIR
speed = {}
for summary in Path("tune").glob("*/summary.json"):
    data = json.loads(summary.read_text())
    trees = {arm["name"]: arm["tree"] for arm in data["arms"]}
    for row in data["across_suites"]:
        if row["temperature"] == 0 and row.get("speedup_geomean"):
            speed.setdefault(row["arm"], []).append((row["speedup_geomean"], trees[row["arm"]]))
for kind in sys.argv[1].split():
    ranked = sorted(speed[f"main/{kind}"], key=lambda x: -x[0])
    dest = SHIPPED_DRAFTERS_DIR / kind
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copy(f"main/{kind}/model.safetensors", dest / "model.safetensors")
    config = json.loads(Path(f"main/{kind}/config.json").read_text())
    config["tree"] = {**ranked[0][1], "min_prob": 0.02}         # EOS leaves are always on; min_prob set a priori
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    train = json.loads(Path(f"main/{kind}/train_config.json").read_text())
    train["data"] = [Path(d).name for d in train["data"]]
    if train.get("init"):                                       # INIT_FROM's folder name and the type
        train["init"] = "/".join(Path(train["init"]).parts[-2:])
    (dest / "train_config.json").write_text(json.dumps(train, indent=2) + "\n")
    print(kind, "tree", ranked[0][1], "tuning:", [(round(v, 2), t["depth"], t["total_tokens"]) for v, t in ranked])
PY
    ;;
  ablation-eval)  # τ and acceptance only (speed is not compared here): two halves, one core each; arms not
                  # trained (no train_config.json) are left out
    G1=abl/msd-2stage,abl/msd-mixed,abl/eagle-2stage,abl/flash-k2,abl/flash-k1,abl/vispec,abl/vispec-nocompress
    G1=$G1,abl/vispec-noglobal
    G2=abl/vispec-regen,abl/vispec-ref,abl/lumen,abl/lumen-sampled,abl/lumen-kv,abl/lumen-nologit,abl/lumen-novisual
    G2=$G2,abl/lumen-noglobal
    for g in 1 2; do
      arms=G$g
      arms=$(for a in ${!arms//,/ }; do [ -f $a/train_config.json ] && printf ",%s" $a; done)
      [ -z "$arms" ] && continue
      vlmspec bench --target testbed --drafters none$arms --suites describe,caption,multi_image,text_chat \
          --limit 8 --temperatures 0 --max-new-tokens 128 --cost-repeats 2 --no-plots --quiet --out abl-eval$g &
    done
    wait ;;
  heldout)  # held-out acc@d of the main runs (and the ablation arms present) on the evaluation suites that
             # ablation-eval uses, collected with the target's own greedy answers
    vlmspec collect --target testbed --suites describe,caption,multi_image,text_chat --regenerate --out evaldata --quiet
    python $SCRIPTS/draft_accuracy.py --target testbed --data evaldata \
        --drafters $(printf "main/%s " $DRAFTERS) $(ls abl/*/train_config.json 2>/dev/null | xargs -rn1 dirname) ;;
  bench)  # the reported run, on the quiet machine with both cores: shipped drafters (tuned trees), the text
          # assistant as our draft-model (its tuned tree) and as HF's assisted-generation peer
    OMP_NUM_THREADS=2 vlmspec bench --target testbed --drafters none$(printf ",testbed:%s" $DRAFTERS),draft-model \
        --drafter-option draft-model:model=text-assistant \
        --drafter-option draft-model:tree=kind=dynamic,depth=5,topk=4,total=16,min_prob=0.02 \
        --peers hf-assisted:text-assistant \
        --suites caption,describe,vqa,ocr,chart,multi_image,text_chat --limit 8 --temperatures 0,1 \
        --max-new-tokens 128 --out bench ;;
esac
