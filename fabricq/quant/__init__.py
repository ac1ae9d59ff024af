"""The math of fabricq: quantization grids, Hessians, the GPTQ solver and int32 packing.

Pure torch, no I/O, no framework: every function here can be read, tested and reused alone.
"""
