"""Engines at run time: a causal-LM runner over a TensorRT / TensorRT-RTX engine, the commands
that validate and time it on the target, and the Triton model repository that serves it.

    device.py   device memory, stream and CUDA graphs (Polygraphy's CUDA wrapper + libcudart)
    engine.py   EngineCausalLM: prefill/decode steps with the KV cache, profile choice by
                shape, CUDA-graph decode; the runtime compatibility checks
    standin.py  a STAND-IN for the TensorRT runtime that executes the same ONNX graph in ONNX
                Runtime on the CPU (tests and machines without a GPU; never a measurement)
    evaluate.py `dsc validate/bench --engine`, `dsc device-check`
    triton.py   the Triton model repository (Python backend around EngineCausalLM)

Nothing here imports tensorrt, tensorrt_rtx or polygraphy at import time.
"""
