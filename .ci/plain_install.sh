#!/usr/bin/env bash
# A plain `pip install .` (no test extra) must run every job. This installs the package
# into a fresh venv, then, from a folder outside the source tree (so the installed copy is
# what runs), pretrains a tiny BERT, fine-tunes it with evaluation on three task types
# (each metric's library: scikit-learn, SciPy, seqeval), exports one to Hugging Face and
# encodes with it. Any job that needs a package only the test extra brings fails here.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
data=$(cd "$root/../shared/data" && pwd)
py=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "plain_install: fresh venv in $tmp/venv, pip install . (no extras)" >&2
"$py" -m venv "$tmp/venv"
"$tmp/venv/bin/python" -m pip install -q --upgrade pip
"$tmp/venv/bin/python" -m pip install -q "$root"
cd "$tmp"
py="$tmp/venv/bin/python"
"$py" -c 'import bert_jax, sys; sys.exit(0 if "site-packages" in bert_jax.__file__ else 1)' ||
  { echo "plain_install: bert_jax was not imported from the installed copy" >&2; exit 1; }
export JAX_PLATFORMS=cpu

books="$root/bert_jax/corpus/train"
"$py" -m bert_jax.jobs.pretrain --flagfile="$root/experiments/tiny.flags" --workdir=pre \
  --corpus="$books/shakespeare-macbeth.txt,$books/shakespeare-caesar.txt" \
  --heldout_corpus="$root/bert_jax/corpus/heldout/carroll-alice.txt" --train_steps=4

head -n 201 "$data/classification/sst2/train.tsv" > sst2_train.tsv
head -n 101 "$data/classification/sst2/dev.tsv" > sst2_dev.tsv
head -n 201 "$data/pair/stsb/train.tsv" > stsb_train.tsv
awk 'NR > 400 && /^$/ {exit} {print}' "$data/ner/conll2003/train.txt" > conll_train.txt
awk 'NR > 200 && /^$/ {exit} {print}' "$data/ner/conll2003/valid.txt" > conll_valid.txt
common=(--init_checkpoint=pre --max_seq_length=32 --batch_size=8 --epochs=1 --learning_rate=1e-3 --select_on=dev)
"$py" -m bert_jax.jobs.finetune --flagfile="$root/experiments/finetune/sst2.flags" "${common[@]}" \
  --train_file=sst2_train.tsv --eval_files=dev=sst2_dev.tsv --workdir=ft_cls
"$py" -m bert_jax.jobs.finetune --flagfile="$root/experiments/finetune/stsb.flags" "${common[@]}" \
  --train_file=stsb_train.tsv --eval_files=dev=stsb_train.tsv --workdir=ft_reg
"$py" -m bert_jax.jobs.finetune --flagfile="$root/experiments/finetune/conll2003.flags" "${common[@]}" \
  --train_file=conll_train.txt --eval_files=dev=conll_valid.txt --workdir=ft_ner
for w in ft_cls ft_reg ft_ner; do test -s "$w/eval/dev.json" || { echo "plain_install: $w wrote no eval" >&2; exit 1; }; done

cut -f1 sst2_dev.tsv > sst2_dev_sentences.tsv
"$py" -m bert_jax.jobs.predict --checkpoint=ft_cls/best --input=sst2_dev_sentences.tsv --output=sst2_pred.tsv
test "$(wc -l < sst2_pred.tsv)" = 101 || { echo "plain_install: predict wrote $(wc -l < sst2_pred.tsv) lines" >&2; exit 1; }
"$py" -m bert_jax.jobs.convert --checkpoint=ft_cls/best --to_hf=hf_cls
printf 'a fine film\nnot good at all\n' > texts.txt
"$py" -m bert_jax.jobs.encode --checkpoint=pre --input=texts.txt --output=features.npz
"$py" -m bert_jax.jobs.heldout --checkpoint=pre --text="$root/bert_jax/corpus/heldout/carroll-alice.txt" \
  --max_seq_length=32 --batches=2 --out=heldout.json
test -s heldout.json || { echo "plain_install: heldout wrote nothing" >&2; exit 1; }
# a one-run sweep (its base: tiny.flags with the corpus paths made absolute)
sed "s|bert_jax/corpus/|$root/bert_jax/corpus/|g" "$root/experiments/tiny.flags" > tiny.flags
"$py" -m bert_jax.jobs.sweep --job=pretrain --base=tiny.flags --grid=train_steps=2 --seeds=0 --out=sweep
"$py" -m bert_jax.jobs.report --runs=sweep --out=sweep_report
test -s sweep_report/sweep.md || { echo "plain_install: report wrote no sweep table" >&2; exit 1; }
"$py" -m bert_jax.jobs.bench --flagfile="$root/experiments/tiny.flags" --steps=1 --warmup=0 > bench.jsonl
echo "plain_install: pretrain, finetune (classification, regression, NER), predict, convert, encode, heldout, sweep, report, bench ran on a plain install" >&2
