"""Weight formats (`quant=`): one file per format behind a small base (engine/quant/base.py), and the
schemes that decide which layer gets which (configs/quant/*.yaml name them).

`quant=` picks a mode: `none` (every weight in the model dtype), `int8`, `int8_groups` or `int4` (quantize every
linear layer at load), or `auto` (keep what a GGUF file holds: 4-bit blocks stay 4-bit, 5- to 8-bit blocks become
grouped int8, float tensors stay float). A fused layer (QKV, gate+up) takes the most precise format of its parts.
The LM head and the token embeddings (one table when tied) are never int4: int4 groups along the hidden size would
save 14 MB on SmolLM2 but give up the int8 GEMM of VNNI CPUs for the batched steps (the 49152-row head at 32
rows: 4.5 ms through `_int_mm`, 25 ms in fp32 there); under `auto` they take grouped int8 (a Q8_0 head as it is).

What each GGUF type becomes under `auto` (weight error and perplexity per type, measured: README, "Quantized
weights"; `experiments/gguf_types.py`):

| GGUF type | format | weight error |
|---|---|---|
| F32, F16, BF16 | model dtype | none |
| Q4_0, Q4_1, Q4_K | int4, groups of 32 with scale and offset | none (same values, same groups) |
| Q8_0, Q5_0 (and Q4_0 in a head or embedding) | int8, groups of 32 with one scale (the file's blocks) | none |
| Q5_1, Q5_K, Q6_K (and Q4_1/Q4_K in a head or embedding) | int8, groups of 32, rounded | relative RMS 2-6e-3 |
| anything else (Q2_K, Q3_K, IQ*) | int8, groups of 32, rounded | that of the file, plus 8-bit rounding |
"""
