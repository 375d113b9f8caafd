//! Reading and writing attention tensors as safetensors files.
