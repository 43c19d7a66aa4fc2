"""Node metadata shared by the passes and validation: module paths and the rescaled mark.

The exporter records, on every node, the module it came from (metadata
`pkg.torch.onnx.name_scopes`); the quantization passes select layers by that path, and
`dsc.validate.locate` names where a candidate departs from its reference by it. A pass that
scales a tensor per channel on purpose (SmoothQuant / AWQ) marks its node with `RESCALED_KEY`,
so the divergence search does not compare it. Kept here, below both, so the passes never import
validation.
"""

from __future__ import annotations

import ast

SCOPE_KEY = "pkg.torch.onnx.name_scopes"
RESCALED_KEY = "dsc.rescaled"  # node metadata: its output is scaled per channel by design


def module_path(node) -> str | None:
    """The innermost module path `node` came from (e.g. `model.layers.3.mlp`), or None."""
    raw = node.metadata_props.get(SCOPE_KEY)
    if not raw:
        return None
    try:
        scopes = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return None
    chain = []
    for s in scopes:
        if not s:
            continue
        if chain and not s.startswith(chain[-1] + "."):
            break
        chain.append(s)
    return chain[-1] if chain else None
