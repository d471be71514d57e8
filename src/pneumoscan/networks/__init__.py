"""The networks and their inference forms: the model registry, the optimizer, augmentation, CPU kernels
and CUDA graphs, precision, the checkpoint file, ensembles, the out-of-distribution detector and the ONNX export."""
