"""A training run: the run directory, set-up, the loop and its step, checkpoints and resume, stops, the overflow
policy, metrics, the noise scale, processes, sweeps and export. Kept free of imports here: `python -m bigbatch`
installs its signal handlers from `bigbatch.run.preemption` before anything heavy loads."""
