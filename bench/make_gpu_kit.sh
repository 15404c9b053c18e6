#!/usr/bin/env bash
# make gpu-kit: wheels for bench/gpu.sh (bench/gpu-kit.txt, for each GPU_KIT_PYTHONS version) and
# the benchmark's call audio pre-rendered as .npy, into $KIT (ignored by git). Fails when the kit
# weighs more than GPU_KIT_MAX_MIB (what a device run may carry beside the repository).
set -euo pipefail
PY=${PY:-.venv/bin/python}
KIT=${KIT:-gpu-kit}
PYTHONS=${GPU_KIT_PYTHONS:-3.11 3.12}
MAX_MIB=${GPU_KIT_MAX_MIB:-60}
PLATFORMS=(manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64
           manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64)
mkdir -p "$KIT/wheels" "$KIT/audio"
binary=$(mktemp); trap 'rm -f "$binary"' EXIT
grep -v '^#' bench/gpu-kit.txt | grep -v '^antlr4-python3-runtime' > "$binary"
for v in $PYTHONS; do
  echo "gpu-kit: wheels for Python $v" >&2
  "$PY" -m pip download -q --no-deps --only-binary=:all: --implementation cp --python-version "$v" \
    "${PLATFORMS[@]/#/--platform=}" -d "$KIT/wheels" -r "$binary"
done
# antlr4-python3-runtime 4.9.3 (omegaconf's pin) is published as a source archive only.
antlr=$(grep '^antlr4-python3-runtime' bench/gpu-kit.txt)
ls "$KIT"/wheels/antlr4_python3_runtime-* >/dev/null 2>&1 || {
  echo "gpu-kit: building $antlr (pure Python, no wheel on PyPI)" >&2
  "$PY" -m pip wheel -q --no-deps -w "$KIT/wheels" "$antlr"
}
echo "gpu-kit: rendering the benchmark's call audio (espeak-ng)" >&2
"$PY" - "$KIT/audio" <<'PYEOF'
import sys
from pathlib import Path

import numpy as np

from producer_tools.conversation import default_conversations

out = Path(sys.argv[1])
for name, conv in sorted(default_conversations().items()):
    np.save(out / f"{name}.npy", conv.audio.astype(np.float32))
    print(f"  {name}: {len(conv.audio) / 16000:.1f} s", file=sys.stderr)
PYEOF
kib=$(du -sk "$KIT" | cut -f1)
echo "gpu-kit: $KIT weighs $((kib / 1024)) MiB ($(ls "$KIT/wheels" | wc -l) wheels)" >&2
if (( kib > MAX_MIB * 1024 )); then
  echo "gpu-kit: over the ${MAX_MIB} MiB limit (GPU_KIT_MAX_MIB)" >&2
  exit 1
fi
