"""Graph passes on onnx_ir (installed as `dsc.passes`; always import it by that name)."""
