/* The mmafm decode kernels: one translation unit, compiled on first use by
   mmafm/inference/kernels.py (cc -O3 -march=native -pthread -shared -fPIC -I<this folder>).

   kernels.h is included once per storage type; the macros below say what the weights and the
   K/V cache are made of. Exported names are declared in api.h. */
#include "common.h"

/* the LoRA terms of a mixed-adapter step, called by both variants below */
#include "lora.c"

/* float32 weights and cache (float32 models) */
#define WEIGHT_T float
#define LOAD_W(v) f32_load(v)
#define CACHE_T float
#define LOAD_C(v) f32_load(v)
#define STORE_C(f) f32_store(f)
#define STORAGE_SUFFIX f32
#include "kernels.h" /* undefines the storage macros at its end */

/* bfloat16 weights and cache (models cast with .to(torch.bfloat16)): half the bytes per token */
#define WEIGHT_T bf16_t
#define LOAD_W(v) bf16_load(v)
#define CACHE_T bf16_t
#define LOAD_C(v) bf16_load(v)
#define STORE_C(f) bf16_store(f)
#define STORAGE_SUFFIX bf16
#include "kernels.h" /* undefines the storage macros at its end */

/* the packed low-bit GEMV of mmafm.compress (shares this unit's thread pool), and its opt-in
   int8-activation path (q8.c, called by lut.c) */
#include "q8.c"
#include "lut.c"
