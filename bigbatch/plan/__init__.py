"""`bigbatch plan`: memory per GPU for each ZeRO stage and precision (memory), step time and time to train (timing),
the device and interconnect catalogue (hardware)."""
