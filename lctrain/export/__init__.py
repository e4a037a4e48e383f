"""Hugging Face export and import.

- `hf_export.export_run(source, out_dir)`: a run or checkpoint -> a model directory transformers loads
  (plain Llama for pure attention, lctrain modeling code with auto_map for hybrids).
- `hf_import.load_hf_weights(model, path)` / `follow_hf_config`: `checkpoint.init_from: hf:PATH`.
- `load.load_model(path)`: (model, tokenizer) from a run, a checkpoint or an export.
"""
