"""Quantized checkpoints on disk: the files, the two formats, the engines that serve them.

- `files`: safetensors shards written and read, config.json, file permissions, the read result.
- `model`: what a writer takes from the model (checked quantized modules, unquantized tensors, config).
- `compressed_tensors`: the compressed-tensors pack-quantized writer and its one reader.
- `gptq`: the GPTQ (v1) format writer and reader.
- `engines`: what serving engines accept (rules, module specs), export dtype, pre-flight.
- `load`: format detection and `load_checkpoint`, every tensor checked against config.json.
- `convert`: one format into the other, without re-quantizing.
- `save`: the writer dispatch of `export.format` (`save_checkpoints`), `round_unquantized`.

This file imports nothing: import the module you need.
"""
