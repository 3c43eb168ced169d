/* Force-included (`-include`) ahead of every mlx-c source file by mlx-sys's build.rs.
 *
 * 1. std::format. mlx-c uses it only to build error messages in mlx/c/private/io.h, always
 *    with plain "{}" placeholders. libstdc++ before GCC 13 (Debian 12 ships GCC 12) has no
 *    <format>, so where the library lacks it this header supplies a minimal version that
 *    substitutes each "{}" in turn. Where the library has it, nothing is defined.
 * 2. float16_t / bfloat16_t. mlx-c's half.h declares them only on aarch64, and so compiles
 *    mlx_array_{item,data}_{float16,bfloat16} only there; mlx-rs calls those functions on
 *    every platform. Elsewhere this header names MLX's own software half types (2-byte
 *    structs, the same layout as the u16 the Rust bindings use) and marks them present.
 */
#pragma once
#ifdef __cplusplus

#include <version>

#if !defined(__cpp_lib_format)
#include <sstream>
#include <string>
#include <string_view>
namespace std {
namespace mlx_sys_format_shim {
inline void append(ostringstream& out, string_view rest) {
  out << rest;
}
template <class First, class... More>
void append(
    ostringstream& out,
    string_view rest,
    const First& first,
    const More&... more) {
  const auto at = rest.find("{}");
  if (at == string_view::npos) {
    out << rest;
    return;
  }
  out << rest.substr(0, at) << first;
  append(out, rest.substr(at + 2), more...);
}
} // namespace mlx_sys_format_shim

template <class... Args>
string format(string_view pattern, const Args&... args) {
  ostringstream out;
  mlx_sys_format_shim::append(out, pattern, args...);
  return out.str();
}
} // namespace std
#endif // !__cpp_lib_format

#if !defined(__aarch64__) && !defined(HAS_FLOAT16) && !defined(HAS_BFLOAT16) && \
    __has_include(<mlx/types/half_types.h>)
#include <mlx/types/half_types.h>
#define HAS_FLOAT16
#define HAS_BFLOAT16
using float16_t = mlx::core::float16_t;
using bfloat16_t = mlx::core::bfloat16_t;
#endif

#endif // __cplusplus
