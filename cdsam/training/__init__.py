"""Training one curriculum stage: the trainer, its stage setup (curriculum, feature cache, batch
size, frozen weights, compiling), resume state, profiling and the benchmark."""
