// Environment settings of the CUDA paths (benchmarks and tests force choices
// with them; each is read once per op call where it matters).
#pragma once

#include <c10/util/Exception.h>

#include <cstdlib>
#include <initializer_list>
#include <string>
#include <utility>

namespace varlen {

// The value of a setting that takes one of a few names: the enumerator of its
// name, the first choice's when the variable is unset or empty; any other value
// is an error naming the variable, the choices and the value.
template <typename E>
E choice_setting(const char* variable, std::initializer_list<std::pair<const char*, E>> choices) {
  const char* v = std::getenv(variable);
  const std::string s = v ? v : "";
  if (s.empty()) return choices.begin()->second;
  std::string names;
  size_t i = 0;
  for (const auto& [name, value] : choices) {
    if (s == name) return value;
    names += std::string(i == 0 ? "'" : i + 1 == choices.size() ? " or '" : ", '") + name + "'";
    ++i;
  }
  TORCH_CHECK(false, variable, " must be ", names, ", got '", s, "'");
}

// The value of a setting that is 'auto' (or unset: `fallback`) or a whole
// number in [lo, hi] of at most 4 digits; any other value is an error naming
// the variable, what it holds (`what`), the range and the value.
int64_t number_setting(const char* variable, int64_t fallback, int64_t lo, int64_t hi,
                       const char* what);

}  // namespace varlen
