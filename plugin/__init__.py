"""TensorRT's GridAnchor_TRT, FlattenConcat_TRT and NMS_TRT plugins: numpy references and ONNX Runtime ops."""
