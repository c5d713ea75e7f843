#!/usr/bin/env bash
# Puts beside the checkout what a GPU gate run carries to a device machine that reaches no package index:
#   .whl/    the wheels the gate needs that the device image lacks (trl, datasets and theirs, gguf), the versions
#            of this checkout's .venv
#   .real1/ .real2/   the pretrained SmolLM2-135M-Instruct GGUF (--real-model) in two halves under the 64 MiB a call
#            carries, and its sha256 (from the cache tests/real fills; run `pytest -m real` first if it is empty)
#   with `peers`, also benchmarks/peers.py's systems, in two folders under the 64 MiB a call carries:
#   .whl_peers_a/  bitsandbytes, Liger-Kernel, torchtune 0.6.1 with torchao 0.13 (0.18 lost torchao.dtypes.nf4tensor,
#                  which torchtune 0.6.1 imports), torchdata, omegaconf and antlr4's source archive (no wheel)
#   .whl_peers_b/  Unsloth with the versions it pins (transformers <= 5.17, trl <= 1.15, datasets < 5): installed into
#                  a folder of its own and named by QLORA_PEERS_SITE_UNSLOTH, so the other systems keep the image's
# All are ignored through .git/info/exclude. Then, in two calls made back to back (the machine stays warm):
#   carry [".real1"]:          cp .real1/part /tmp/part1
#   carry [".real2", ".whl"]:  cat /tmp/part1 .real2/part > /tmp/m.gguf && echo "$(cat .real2/sha256)  /tmp/m.gguf" |
#                              sha256sum -c && pip install --target /tmp/site .whl/*.whl ... gpu_gate.py --real-model /tmp/m.gguf
# The peers, on the same warm machine (results into /tmp/results.jsonl, which outlives a call, copied to $OUT each time,
# so that memory_budget.py finds the peers' peaks of this GPU; QLORA_GIT_COMMIT=<hash>: the device copy's git may not
# be the tree's):
#   carry [".whl_peers_a"]: pip install --no-index --no-deps --target /tmp/site_a .whl_peers_a/bitsandbytes* \
#                           .whl_peers_a/liger*; torchtune's (torchtune, torchao, torchdata, omegaconf, antlr4) the same way
#                           into /tmp/tt, with --no-build-isolation (antlr4 is a source archive and no index is reached:
#                           build isolation fails), named by QLORA_PEERS_SITE_TORCHTUNE=/tmp/tt; QLORA_RESULTS=
#                           /tmp/results.jsonl PYTHONPATH=src:/tmp/site_a:/tmp/site:. peers.py --systems <some> ...
#   carry []:               the rest of the systems the same way, then memory_budget.py --peaks-from /tmp/results.jsonl
#   carry [".whl_peers_b"]: pip install ... --target /tmp/site_unsloth .whl_peers_b/*; QLORA_PEERS_SITE_UNSLOTH=
#                           /tmp/site_unsloth peers.py --systems unsloth ...
set -euo pipefail
cd "$(dirname "$0")/.."
for d in .whl .real1 .real2 .whl_peers_a .whl_peers_b; do
    grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude
done
version() { .venv/bin/python -c "import importlib.metadata as m; print(m.version('$1'))"; }
mkdir -p .whl
specs=()
for name in trl datasets dill multiprocess gguf; do specs+=("$name==$(version $name)"); done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${specs[@]}"
gguf=${QLORA_FSDP_CACHE:-$HOME/.cache/qlora_fsdp}/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$gguf" ]; then
    echo "prepare_device_carry: $gguf not found: run '.venv/bin/python -m pytest -m real' once to fetch it" >&2
    exit 1
fi
mkdir -p .real1 .real2
half=50000000
head -c $half "$gguf" > .real1/part
tail -c +$((half + 1)) "$gguf" > .real2/part
sha256sum "$gguf" | cut -d' ' -f1 > .real2/sha256
ls -l .whl .real1 .real2
if [ "${1:-}" = peers ]; then
    get() { dir=$1; shift; python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$dir" "$@"; }
    get .whl_peers_a bitsandbytes==0.50.2 liger-kernel==0.8.5 torchtune==0.6.1 torchao==0.13.0 torchdata==0.11.0 \
        omegaconf==2.3.0
    python3 -m pip download -q --no-deps --no-binary=:all: -d .whl_peers_a antlr4-python3-runtime==4.9.3
    get .whl_peers_b unsloth==2026.10.9 unsloth-zoo==2026.10.9 transformers==5.17.0 trl==1.15.0 datasets==4.8.4 \
        torchao==0.13.0 tyro cut-cross-entropy msgspec hf-transfer diffusers docstring-parser typeguard shtab
    du -sh .whl_peers_a .whl_peers_b
fi
