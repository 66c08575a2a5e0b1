"""Speed and memory benchmarks of the ngkernels ops against eager PyTorch, torch.compile and the copy bandwidth."""
