"""`lctrain plan`: how a recipe will run on N GPUs — memory, communication and time per candidate configuration.

One concern per module: `gpus` (hardware and efficiencies), `shape` (the model's dimensions from a meta-device
build), `memory`, `comm` (the exact bytes `lctrain.parallel.comm` counts), `compute` (FLOPs and time), `search`
(candidates, feasibility, ranking), `report` (table and JSON), `command` (the CLI).
"""
