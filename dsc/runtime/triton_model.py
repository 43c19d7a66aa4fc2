"""Triton Python-backend model serving a dsc engine: copied by `dsc triton` as `<model>/1/model.py`.

Decoupled (streaming): each request gets one response per generated piece of text, then a final
empty response with TRITONSERVER_RESPONSE_COMPLETE_FINAL. Inputs: `text_input` (string),
optional `max_tokens` (int32, default the config's `default_max_tokens`). Output: `text_output`
(string). Requests of one `execute` call run together, up to the profile's max batch per pass.

Beside this file: `model.engine`, `model_io.json`, `dsc_model.json` (the engine's manifest
record and the envelope) and the tokenizer files. Needs `dsc` (and polygraphy, the TensorRT or
TensorRT-RTX runtime) importable by the Triton Python backend's interpreter.
"""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        from dsc.runtime.triton import load_model

        here = Path(args["model_repository"]) / str(args["model_version"])
        config = json.loads(args["model_config"])
        params = {k: v["string_value"] for k, v in (config.get("parameters") or {}).items()}
        self.model = load_model(
            here,
            runtime=params.get("runtime") or None,
            cuda_graphs=params.get("cuda_graphs", "1") == "1",
        )
        self.default_max_tokens = int(params.get("default_max_tokens", "64"))

    def execute(self, requests):
        from dsc.errors import DscError

        work = []
        for request in requests:
            sender = request.get_response_sender()
            text = pb_utils.get_input_tensor_by_name(request, "text_input").as_numpy()
            text = text.reshape(-1)[0]
            text = text.decode("utf-8", "replace") if isinstance(text, bytes) else str(text)
            mt = pb_utils.get_input_tensor_by_name(request, "max_tokens")
            max_tokens = (
                int(mt.as_numpy().reshape(-1)[0]) if mt is not None else self.default_max_tokens
            )
            try:
                ids = self.model.admit(text, max_tokens)
            except DscError as e:
                sender.send(
                    pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e))),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL,
                )
                continue
            work.append((sender, ids, max_tokens))
        for chunk in self.model.chunks(work):
            for sender, piece, final in self.model.run(chunk):
                if piece:
                    out = pb_utils.Tensor("text_output", np.array([piece.encode()], dtype=object))
                    sender.send(pb_utils.InferenceResponse(output_tensors=[out]))
                if final:
                    sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
        # decoupled: every response went through a sender; execute returns nothing

    def finalize(self):
        self.model = None
