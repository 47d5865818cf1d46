// setting.h: the CPU kernels' run-time choices (product engine, time loop): read from an
// environment variable at first use, changeable after through their set_* functions.
#pragma once

#include <atomic>
#include <cstdint>

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

}  // namespace zoneout_cpu
