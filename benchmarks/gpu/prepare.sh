#!/usr/bin/env bash
# Here, before the one call on the accelerator machine: what the device image lacks, into two ignored
# folders that the call carries ([".whl", ".gpu-assets"]; about 30 MiB of the 64 MiB a call may take).
#   .whl/         cp312 wheels of leadkd's dependencies missing there (faiss-cpu, ir-measures,
#                 pytrec-eval-terrier, pydantic and its own, a typing-extensions new enough for it), one each
#   .gpu-assets/  BERT-base's tokenizer files (from the all-MiniLM-L6-v2 package) and SciFact's corpus
#                 (from $LEADKD_DATA_DIR), the texts the benchmark encodes
set -euo pipefail
cd "$(dirname "$0")/../.."
wheels=(faiss-cpu==1.15.1 ir-measures==0.4.3 pytrec-eval-terrier==0.5.11 pydantic==2.13.4 pydantic-core==2.46.4
        annotated-types==0.7.0 typing-inspection==0.4.2 typing-extensions==4.16.0)
mkdir -p .whl .gpu-assets
for wheel in "${wheels[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .whl "$wheel"
done
model=$(python3 -c "from leadkd.models.base import resolve_model_path; print(resolve_model_path('all-MiniLM-L6-v2'))")
for name in tokenizer.json tokenizer_config.json special_tokens_map.json vocab.txt; do
  cp "$model/$name" .gpu-assets/
done
corpus="${LEADKD_DATA_DIR:?set LEADKD_DATA_DIR to the BEIR data folder}/scifact/corpus.jsonl"
mkdir -p .gpu-assets/scifact && cp "$corpus" .gpu-assets/scifact/corpus.jsonl
du -sh .whl .gpu-assets
