"""Weight formats (`quant=`): one file per format behind a small base (engine/quant/base.py), and the
schemes that decide which layer gets which (configs/quant/*.yaml name them).

`quant=` picks a mode: `none` (every weight in the model dtype), `int8` or `int4` (quantize every linear
layer at load), or `auto` (keep what a GGUF file holds: 4-bit blocks stay 4-bit, 5- to 8-bit blocks
become int8, float tensors stay float). A fused layer (QKV, gate+up) takes the most precise format of
its parts. The LM head and the token embeddings (one table when tied) are int8 whenever they are
quantized at all: int4 groups along the hidden size would save 14 MB on SmolLM2 but give up int8's
GEMM for the batched steps (the 49152-row head at 32 rows: 4.5 ms through `_int_mm`, 25 ms in fp32 here).

What each GGUF type becomes under `auto`:

| GGUF type | format | loss |
|---|---|---|
| F32, F16, BF16 | model dtype | none |
| Q4_0, Q4_1, Q4_K | int4, groups of 32 with scale and offset | none (same values, same groups) |
| Q8_0, Q5_0, Q5_1, Q5_K, Q6_K | int8 per row (dequantized, then re-quantized) | small (perplexity-tested) |
| anything else (Q2_K, Q3_K, IQ*) | int8 per row, as above | that of the file |
"""
