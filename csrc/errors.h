// Exception types shared by the host C++ core. The pybind11 bindings map each one to a
// specific Python exception, so callers can tell "the pool is full" (recoverable: wait)
// from "you passed a sequence id that does not exist" (a caller bug).
#pragma once

#include <stdexcept>
#include <string>

namespace pgen {

// The KV block pool cannot satisfy an allocation. Python: pgen_engine._C.OutOfKVBlocksError
// (a MemoryError subclass).
struct OutOfBlocksError : std::runtime_error {
  explicit OutOfBlocksError(const std::string& msg) : std::runtime_error(msg) {}
};

// A sequence / request id that is unknown (never added, or already freed). Python: KeyError
// subclass pgen_engine._C.UnknownIdError.
struct UnknownIdError : std::runtime_error {
  explicit UnknownIdError(const std::string& msg) : std::runtime_error(msg) {}
};

// An operation that is invalid in the current state (duplicate id, protocol misuse).
// Python: pgen_engine._C.SchedulerStateError (a RuntimeError subclass).
struct StateError : std::runtime_error {
  explicit StateError(const std::string& msg) : std::runtime_error(msg) {}
};

}  // namespace pgen
