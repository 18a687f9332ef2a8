/* The exported symbols of the mmafm decode kernels (mmafm/inference/kernels.py binds each one:
   its SYMBOLS table lists the same names with their ctypes signatures, in this order).

   Every function computes in float32. "_f32" variants read float32 weights and K/V cache,
   "_bf16" variants bfloat16 ones (converted to float32 in registers). Functions returning int
   return 0 on success, 1 when out of memory (their outputs are then undefined unless stated),
   2 for an out-of-range token or position (mmafm_decode_step_*, nothing written). */
#ifndef MMAFM_API_H
#define MMAFM_API_H

#include <stdint.h>

typedef uint16_t bf16_t; /* bfloat16 storage: the upper 16 bits of a float32 */

/* One decoder layer's weights and K/V storage for a whole decode step (mirrored by DecodeLayer
   in kernels.py); matrices and caches in the step's storage type, gains float32. */
typedef struct {
  const float* attn_norm;
  const void *wq, *wk, *wv, *wo;  /* wk = wv = NULL: the layer shares K/V */
  const float *q_norm, *k_norm, *ffn_norm;
  const void *w_gate, *w_up, *w_down;
  void *k_cache, *v_cache;  /* (batch, kv_heads, slots, head_dim): its own, or its source layer's */
  long kv_batch_stride, kv_head_stride, slots;
  long ring;    /* 1: sliding-window ring buffer, column t in slot t % slots */
  long rope;    /* 1: RoPE, 0: no positional encoding */
  long hidden;  /* SwiGLU width */
} mmafm_layer_t;

/* y[r] = rms_norm(x[r]) * w for rows r; y may be x */
void mmafm_rms_norm_f32(const float* x, const float* w, float* y, long rows, long dim, float eps);

/* y = [x w0^T | x w1^T | x w2^T] for `batch` rows (w1 / w2 unused when out1 / out2 are 0) */
void mmafm_gemv3_f32(const float* x, const float* w0, const float* w1, const float* w2, float* y,
                     long batch, long out0, long out1, long out2, long in, int nthreads);
void mmafm_gemv3_bf16(const float* x, const bf16_t* w0, const bf16_t* w1, const bf16_t* w2, float* y,
                      long batch, long out0, long out1, long out2, long in, int nthreads);

/* the attention half of a pre-norm decoder layer for one new token per row (see kernels.h) */
int mmafm_attention_decode_f32(
    const float* x, float* y, const float* norm_w, float eps,
    const float* wq, const float* wk, const float* wv, const float* wo,
    const float* q_norm_w, const float* k_norm_w, const float* cos, const float* sin,
    float* k_cache, float* v_cache, long kv_batch_stride, long kv_head_stride, long write_slot, long keys,
    const unsigned char* valid, long valid_stride,
    long batch, long dim, long heads, long kv_heads, long head_dim, int nthreads);
int mmafm_attention_decode_bf16(
    const float* x, float* y, const float* norm_w, float eps,
    const bf16_t* wq, const bf16_t* wk, const bf16_t* wv, const bf16_t* wo,
    const float* q_norm_w, const float* k_norm_w, const float* cos, const float* sin,
    bf16_t* k_cache, bf16_t* v_cache, long kv_batch_stride, long kv_head_stride, long write_slot, long keys,
    const unsigned char* valid, long valid_stride,
    long batch, long dim, long heads, long kv_heads, long head_dim, int nthreads);

/* the SwiGLU half of a pre-norm decoder layer, in place on x (batch, dim) */
int mmafm_swiglu_decode_f32(float* x, const float* norm_w, float eps, const float* w_gate,
                            const float* w_up, const float* w_down, long batch, long dim, long hidden,
                            int nthreads);
int mmafm_swiglu_decode_bf16(float* x, const float* norm_w, float eps, const bf16_t* w_gate,
                             const bf16_t* w_up, const bf16_t* w_down, long batch, long dim, long hidden,
                             int nthreads);

/* a whole decode step of a dense decoder: embedding, every layer, final norm, head -> logits */
int mmafm_decode_step_f32(
    const long* tokens, const float* embed, const long* positions, const float* cos_table,
    const float* sin_table, long max_position, long column, const unsigned char* valid, long valid_stride,
    const mmafm_layer_t* layers, long n_layers, const float* final_norm, const float* head,
    float* logits, long batch, long dim, long heads, long kv_heads, long head_dim, long vocab, float eps,
    int nthreads);
int mmafm_decode_step_bf16(
    const long* tokens, const bf16_t* embed, const long* positions, const float* cos_table,
    const float* sin_table, long max_position, long column, const unsigned char* valid, long valid_stride,
    const mmafm_layer_t* layers, long n_layers, const float* final_norm, const bf16_t* head,
    float* logits, long batch, long dim, long heads, long kv_heads, long head_dim, long vocab, float eps,
    int nthreads);

/* mmafm_decode_step over `chunk` consecutive new tokens per cache row (batch = rows x chunk), causal
   within each chunk: the target's verification forward of speculative decoding (see kernels.h) */
int mmafm_decode_chunk_f32(
    const long* tokens, const float* embed, const long* positions, const float* cos_table,
    const float* sin_table, long max_position, long column, long chunk, const unsigned char* valid,
    long valid_stride, const mmafm_layer_t* layers, long n_layers, const float* final_norm, const float* head,
    float* logits, long batch, long dim, long heads, long kv_heads, long head_dim, long vocab, float eps,
    int nthreads);
int mmafm_decode_chunk_bf16(
    const long* tokens, const bf16_t* embed, const long* positions, const float* cos_table,
    const float* sin_table, long max_position, long column, long chunk, const unsigned char* valid,
    long valid_stride, const mmafm_layer_t* layers, long n_layers, const float* final_norm, const bf16_t* head,
    float* logits, long batch, long dim, long heads, long kv_heads, long head_dim, long vocab, float eps,
    int nthreads);

/* LoRA adapters of a whole decode step (csrc/lora.c; mirrored by LoRAMatrix / LoRALayer / _LoRAStep
   in kernels.py): one adapted projection's factors for all `slots` adapters, float32, stacked as
   mmafm.layers.lora.LoRALinear holds them: A (slots, rank, in), scale (slots,), and B transposed:
   (slots, rank, out), LoRALinear's (slots, out, rank) with its last two dimensions swapped;
   A = NULL: the projection has no adapter. */
typedef struct {
  const float *A, *B, *scale;
  long rank;
} mmafm_lora_matrix_t;
enum { MMAFM_LORA_WQ, MMAFM_LORA_WK, MMAFM_LORA_WV, MMAFM_LORA_WO, MMAFM_LORA_W_GATE, MMAFM_LORA_W_UP,
       MMAFM_LORA_W_DOWN, MMAFM_LORA_MATRICES };
typedef struct {
  mmafm_lora_matrix_t m[MMAFM_LORA_MATRICES]; /* indexed by MMAFM_LORA_WQ ... */
} mmafm_lora_layer_t;
typedef struct {
  const mmafm_lora_layer_t* layers; /* one per layer of the step */
  const long* row_slot;             /* (cache rows,) each row's adapter slot, -1 = the base alone */
  long slots;
} mmafm_lora_t;

/* mmafm_decode_step / mmafm_decode_chunk with a mixed-adapter batch: every projection of layer l
   adds scale[s] B_s A_s x for each row's slot s = lora->row_slot[row] (mmafm_lora_t). Returns as
   they do; 2 also for a slot outside [-1, slots) or a rank outside [1, 256] (nothing written). */
int mmafm_lora_decode_step_f32(
    const long* tokens, const float* embed, const long* positions, const float* cos_table,
    const float* sin_table, long max_position, long column, const unsigned char* valid, long valid_stride,
    const mmafm_layer_t* layers, long n_layers, const float* final_norm, const float* head,
    float* logits, long batch, long dim, long heads, long kv_heads, long head_dim, long vocab, float eps,
    const mmafm_lora_t* lora, int nthreads);
int mmafm_lora_decode_step_bf16(
    const long* tokens, const bf16_t* embed, const long* positions, const float* cos_table,
    const float* sin_table, long max_position, long column, const unsigned char* valid, long valid_stride,
    const mmafm_layer_t* layers, long n_layers, const float* final_norm, const bf16_t* head,
    float* logits, long batch, long dim, long heads, long kv_heads, long head_dim, long vocab, float eps,
    const mmafm_lora_t* lora, int nthreads);
int mmafm_lora_decode_chunk_f32(
    const long* tokens, const float* embed, const long* positions, const float* cos_table,
    const float* sin_table, long max_position, long column, long chunk, const unsigned char* valid,
    long valid_stride, const mmafm_layer_t* layers, long n_layers, const float* final_norm, const float* head,
    float* logits, long batch, long dim, long heads, long kv_heads, long head_dim, long vocab, float eps,
    const mmafm_lora_t* lora, int nthreads);
int mmafm_lora_decode_chunk_bf16(
    const long* tokens, const bf16_t* embed, const long* positions, const float* cos_table,
    const float* sin_table, long max_position, long column, long chunk, const unsigned char* valid,
    long valid_stride, const mmafm_layer_t* layers, long n_layers, const float* final_norm, const bf16_t* head,
    float* logits, long batch, long dim, long heads, long kv_heads, long head_dim, long vocab, float eps,
    const mmafm_lora_t* lora, int nthreads);

/* helper threads the kernels' thread pool (pool.h) has started so far: the calls above that take
   nthreads > 1 run on their caller plus up to nthreads - 1 of them */
int mmafm_pool_helpers(void);

/* packed low-bit GEMV (lut.c): y[b, o] = sum_i table[o / group_rows][code(o, i)] x[b, i] for
   batch <= 8 rows, codes of bits = 2, 4 or 8 packed lowest bits first, code_stride bytes per
   weight row, 2^bits float32 table entries per group of group_rows rows; 2 for bad arguments */
int mmafm_lut_gemv_f32(const float* x, const unsigned char* codes, const float* table, float* y, long batch,
                       long out, long in, long code_stride, int bits, long group_rows, int nthreads);

/* One weight matrix of a packed decode step (mirrors PackedMatrix in kernels.py): bits = 2, 4 or 8,
   data the codes (as mmafm_lut_gemv_f32), table 2^bits float32 entries per group of group_rows
   rows, row_scale NULL or one float32 per row multiplying its sums; or bits = 32, data float32
   rows (out, in) and the rest unused. qtable / qaffine, both NULL unless int8 activations are
   asked for (q8.c; 2-/4-bit only): per group 2^bits u8 codes u and (offset, step) float32 with
   table ~ offset + step * u; the step then reads this matrix through them. */
typedef struct {
  const void* data;
  const float* table;
  const float* row_scale;
  long code_stride, group_rows, bits;
  const unsigned char* qtable;
  const float* qaffine;
} mmafm_matrix_t;

/* One decoder layer of mmafm_lut_decode_chunk (mirrors PackedDecodeLayer in kernels.py): as
   mmafm_layer_t, every matrix an mmafm_matrix_t (wk.data = NULL: the layer shares K/V), a
   float32 K/V cache. */
typedef struct {
  const float *attn_norm, *q_norm, *k_norm, *ffn_norm;
  mmafm_matrix_t wq, wk, wv, wo, w_gate, w_up, w_down;
  float *k_cache, *v_cache;
  long kv_batch_stride, kv_head_stride, slots, ring, rope, hidden;
} mmafm_lut_layer_t;

/* mmafm_decode_chunk_f32 for a dense decoder whose embedding, head and layer matrices are each
   packed or float32 (lut.c): `chunk` consecutive new tokens per cache row (batch = rows x chunk
   <= 8; a decode step is a chunk of 1), causal within the chunk, each matrix read once for all its
   rows (a packed prompt, a packed draft's catch-up); Q/K/V and gate/up as one GEMV each; matrices
   with qtable / qaffine take Q8_0-quantized inputs and integer dot products (q8.c). Chunks > 1
   need linear caches with room for them. Returns 0; 1 out of memory; 2 a bad matrix, token,
   position or chunk (nothing written). */
int mmafm_lut_decode_chunk_f32(
    const long* tokens, const mmafm_matrix_t* embed, const long* positions, const float* cos_table,
    const float* sin_table, long max_position, long column, long chunk, const unsigned char* valid,
    long valid_stride, const mmafm_lut_layer_t* layers, long n_layers, const float* final_norm,
    const mmafm_matrix_t* head, float* logits, long batch, long dim, long heads, long kv_heads, long head_dim,
    long vocab, float eps, int nthreads);

/* int8 activations (q8.c): x (rows, in) -> q (rows, in) int8 and d (rows, ceil(in / 32)) float32,
   Q8_0 blocks of 32 columns, d = max|x| / 127, q = rint(x * (1 / d)), ties to even */
void mmafm_q8_quantize(const float* x, signed char* q, float* d, long rows, long in);

/* y (batch, out) = the Q8_0-quantized x against a 2-/4-bit matrix read through its int8 tables
   (mmafm_matrix_t's qtable / qaffine), integer dot products per block; batch <= 8; 2 for bad
   arguments, 1 out of memory */
int mmafm_q8_gemv_f32(const float* x, const unsigned char* codes, const unsigned char* qtable, const float* qaffine,
                      const float* row_scale, float* y, long batch, long out, long in, long code_stride, int bits,
                      long group_rows, int nthreads);

#endif /* MMAFM_API_H */
