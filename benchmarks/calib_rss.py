"""Wall time and peak RSS of layer-wise calibration alone, on an exported artifact.

    /usr/bin/time -v python benchmarks/calib_rss.py ART SAMPLES

Runs `dsc.passes.quant.calibrate.collect(layerwise=True, use_cache=False)` on SAMPLES windows of
128 tokens of the default calibration text and prints one JSON line: seconds, the number of
activations, their sample rows' bytes, how many were spilled to disk, and ru_maxrss in bytes.
docs/BENCHMARKS.md (session 6) holds one run before and after the rows spill.
"""

import json
import resource
import sys
import time
from pathlib import Path

import onnx_ir as ir

from dsc import api
from dsc.passes.quant import calibrate as cal
from dsc.quantize import calibration_windows, read_calibration_text

art, samples = Path(sys.argv[1]), int(sys.argv[2])
io = json.loads((art / "model_io.json").read_text())
model = ir.load(art / io["onnx"])
w = calibration_windows(api.load_tokenizer(art), read_calibration_text(None), samples, 128)
t = time.perf_counter()
st = cal.collect(model, io, w, use_cache=False, layerwise=True)
rows = sum(s.rows.nbytes for s in st.acts.values())
print(
    json.dumps(
        {
            "seconds": round(time.perf_counter() - t, 1),
            "activations": len(st.acts),
            "rows_bytes": rows,
            "spilled": sum(getattr(s, "spilled", False) for s in st.acts.values()),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
    )
)
