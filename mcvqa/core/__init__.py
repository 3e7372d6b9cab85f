"""The pipeline's stages in the user's order: config, hardware, model, data, dataset, scoring, training,
inference, ensemble, submission. Imports neither speed/ nor scale/: those plug in through the objects the
stages are given (a feature cache, a process group)."""
