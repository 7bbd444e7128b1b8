"""`bigbatch plan`, in layers that import only downwards: hardware (the device and interconnect catalogue, the cpu
probe) < memory (bytes per GPU for each ZeRO stage and precision) < timing (FLOPs, communication, step time, time to
train) < teacher (a distillation teacher's shape, bytes and forward FLOPs, read from its run, export or config) <
advice (the largest micro-batch that fits, node scaling, the noise-scale grid) < command (the command line
and its reports)."""
