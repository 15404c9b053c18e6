#!/usr/bin/env bash
# make gpu-kit-verify: prove bench/gpu-kit.txt complete. A clean venv gets only the baseline
# (bench/gpu-kit-baseline.txt, linked from .venv as a stand-in for the GPU image), then the kit
# with --no-index --no-deps, then imports the engine path, builds tiny models and steps a call.
set -euo pipefail
PY=${PY:-.venv/bin/python}
KIT=${KIT:-gpu-kit}
WORK=$(mktemp -d /tmp/gpu-kit-verify.XXXXXX); trap 'rm -rf "$WORK"' EXIT
base=$("$PY" -c 'import sys; print(sys.base_prefix)')/bin/python3
"$base" -m venv --without-pip "$WORK/venv"
site=$("$WORK/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
echo "verify: linking the baseline from .venv into $WORK/baseline" >&2
"$PY" - "$WORK/baseline" <<'PYEOF'
import importlib.metadata as md
import sys
from pathlib import Path

out = Path(sys.argv[1])
out.mkdir()
names = [l.strip() for l in open("bench/gpu-kit-baseline.txt") if l.strip() and not l.startswith("#")]
for name in names:
    dist = md.distribution(name)
    root = Path(dist.locate_file(""))
    tops = {Path(str(f)).parts[0] for f in dist.files or []}
    for top in tops:
        src = root / top
        if top.endswith((".pth",)) or top in {"..", "bin"} or not src.exists():
            continue
        if not (out / top).exists():
            (out / top).symlink_to(src)
PYEOF
# torch's CUDA libraries live in nvidia-* distributions: link them too (the image has them).
for d in "$("$PY" -c 'import site; print(site.getsitepackages()[0])')"/nvidia*; do
  [ -e "$WORK/baseline/$(basename "$d")" ] || ln -s "$d" "$WORK/baseline/"
done
echo "$WORK/baseline" > "$site/baseline.pth"
echo "verify: installing the kit offline" >&2
"$PY" -m pip --python "$WORK/venv/bin/python" install -q --no-index --no-deps \
  --find-links "$KIT/wheels" --target "$WORK/kit" -r bench/gpu-kit.txt
echo "verify: importing the engine path and stepping a tiny call" >&2
PYTHONPATH="$WORK/kit:$PWD" "$WORK/venv/bin/python" - <<'PYEOF'
import tempfile
from pathlib import Path

import numpy as np

from worker.engine.engine import StreamingEngine
from worker.engine.models import build_random_models, load_models

with tempfile.TemporaryDirectory() as cache:
    diar, asr = build_random_models("tiny", Path(cache))
    engine = StreamingEngine(load_models(str(diar), str(asr), "cpu"))
    engine.add_stream("a")
    engine.push_audio("a", np.random.default_rng(0).standard_normal(40000).astype(np.float32) * 0.1)
    engine.end_stream("a")
    while engine.stream_ids:
        for update in engine.step():
            assert update.error is None, update.error
print("verify: the kit runs the engine path with the baseline alone")
PYEOF
