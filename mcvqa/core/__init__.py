"""The stages of the model path in the user's order: config, hardware and the memory plan, model, data,
prompts, collate, scoring, training, inference, ensemble, submission (model families: families/). Admission
rule: a module is here only if it is such a stage; run machinery lives in machinery/ below, run features in
runkit/, speed/ and scale/ beside. A stage imports only machinery/, families/ and other stages: the wings plug in
through the objects the stages are given (a feature cache, a process group, a run clock)."""
