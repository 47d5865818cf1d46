// setting.h: the CPU kernels' run-time choices (product engine, time loop): read from an
// environment variable at first use, changeable after through their set_* functions.
#pragma once

#include <c10/util/Exception.h>

#include <array>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <string>

namespace zoneout_cpu {

// The current value of `value` (-1 until first read), first set by read_environment(), which may
// raise (an unknown value of the variable): then every use raises until it is set another way.
template <typename Read>
int64_t lazy_setting(std::atomic<int64_t>& value, const Read& read_environment) {
  int64_t current = value.load(std::memory_order_relaxed);
  if (current < 0) {
    current = read_environment();
    value.store(current);
  }
  return current;
}

// A choice among N named values, coded 0..N-1, the last one "auto" (what an unset or empty variable
// means): read from the environment variable `variable` at first use (any other name raises, naming
// the variable and the names), changeable after by set(). `what` names it in set()'s errors.
template <size_t N>
class NamedSetting {
 public:
  NamedSetting(const char* variable, const char* what, std::array<const char*, N> names)
      : variable_(variable), what_(what), names_(names) {}

  int64_t get() {
    return lazy_setting(value_, [this] { return from_environment(); });
  }

  // Makes `code` the choice; returns the previous one.
  int64_t set(int64_t code) {
    TORCH_CHECK(code >= 0 && code < int64_t(N), what_, " must be one of ", listed(true), ", got ", code);
    const int64_t previous = get();
    value_.store(code);
    return previous;
  }

 private:
  int64_t from_environment() const {
    const char* value = std::getenv(variable_);
    const std::string name = value == nullptr ? "" : value;
    if (name.empty()) return int64_t(N) - 1;
    for (size_t code = 0; code < N; ++code)
      if (name == names_[code]) return int64_t(code);
    TORCH_CHECK(false, variable_, " must be one of ", listed(false), ", got ", name);
  }

  // "steps, fused, auto", or with their codes "0 (steps), 1 (fused), 2 (auto)".
  std::string listed(bool with_codes) const {
    std::string out;
    for (size_t code = 0; code < N; ++code) {
      if (code > 0) out += ", ";
      out += with_codes ? std::to_string(code) + " (" + names_[code] + ")" : std::string(names_[code]);
    }
    return out;
  }

  const char* variable_;
  const char* what_;
  std::array<const char*, N> names_;
  std::atomic<int64_t> value_{-1};  // -1: not read from the environment yet
};

}  // namespace zoneout_cpu
