//! Paged KV-cache decode on the GPU (split over key ranges, merged by LSE).
