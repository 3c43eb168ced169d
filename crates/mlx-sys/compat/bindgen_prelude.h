/* Read by bindgen ahead of the mlx-c headers (see mlx-sys's build.rs).
 *
 * mlx-c's half.h declares float16_t and bfloat16_t, and with them the
 * mlx_array_item_* / mlx_array_data_* functions for those types, only on aarch64.
 * mlx-rs uses those functions on every platform, so declare the types elsewhere with
 * the shapes bindgen gives them on Apple silicon: float16_t becomes __BindgenFloat16
 * (a u16 newtype, from __fp16) and bfloat16_t a u16. Only pointers to them cross the
 * C ABI. This is a checked-in file on purpose: bindgen reports every header it reads as
 * rerun-if-changed, and one written by the build script would rerun it on every build.
 */
#include <stdint.h>
#if !defined(__aarch64__)
#define HAS_FLOAT16
#define HAS_BFLOAT16
typedef __fp16 float16_t;
typedef uint16_t bfloat16_t;
#endif
