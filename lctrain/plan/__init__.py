"""`lctrain plan`: how a recipe will run on N GPUs — memory, communication and time per candidate configuration.

One concern per module: `gpus` (hardware, efficiencies), `shape` (the model's dimensions from a meta-device build),
`candidate` (one configuration and the workload), `comm` (the bytes `lctrain.parallel.comm` counts, and the
data-parallel traffic), `activations` and `memory` (per-GPU memory), `compute` (FLOPs by kernel family),
`timing` (step time), `search` (candidates, rule-outs, ranking), `report` (table and JSON), `command` (the CLI).
"""
