// The one result type of envelopefs: a closed set of codes, each with context.
// An authentication failure is its own code (never "not found"), so tampering is never
// mistaken for absence. Errno mapping happens only at the FUSE edge (fs/errno_map.h).
#pragma once

#include <cstdint>
#include <string>
#include <utility>
#include <variant>

namespace envelopefs {

enum class Code : uint8_t {
  kOk = 0,
  kInvalidArgument,   // bad input from the user or caller
  kNotFound,          // a file, key or volume that does not exist
  kAlreadyExists,
  kAuthFailed,        // ciphertext, tag, wrapped key or MAC did not authenticate
  kCorrupt,           // structurally malformed data (bad magic, bad length, unknown version)
  kUnsupported,       // a format version or feature flag this build does not know
  kAccessDenied,      // the key service answered and refused (revoked, disabled, wrong secret)
  kUnreachable,       // the key service could not be reached
  kKeyUnavailable,    // keys were dropped (revocation, unmount): fail closed
  kIoError,           // backing storage error; errno() says which
  kNoSpace,
  kInternal,
};

const char* code_name(Code c);

class [[nodiscard]] Status {
 public:
  Status() = default;
  Status(Code code, std::string message, int sys_errno = 0)
      : code_(code), errno_(sys_errno), message_(std::move(message)) {}

  static Status Ok() { return Status(); }
  static Status Io(int err, std::string what);  // maps ENOSPC to kNoSpace

  bool ok() const { return code_ == Code::kOk; }
  Code code() const { return code_; }
  int sys_errno() const { return errno_; }
  const std::string& message() const { return message_; }
  std::string to_string() const;

  // Adds context ("file 3f..., block 12: ") in front of the message.
  Status& prefix(const std::string& context) {
    if (!ok()) message_ = context + ": " + message_;
    return *this;
  }

 private:
  Code code_ = Code::kOk;
  int errno_ = 0;
  std::string message_;
};

// Value or Status. Small on purpose: std::expected is C++23.
template <typename T>
class [[nodiscard]] Result {
 public:
  Result(T value) : v_(std::move(value)) {}  // NOLINT(google-explicit-constructor)
  Result(Status status) : v_(std::move(status)) {}  // NOLINT(google-explicit-constructor)

  bool ok() const { return std::holds_alternative<T>(v_); }
  const Status& status() const {
    static const Status kOkStatus;
    return ok() ? kOkStatus : std::get<Status>(v_);
  }
  T& value() & { return std::get<T>(v_); }
  const T& value() const& { return std::get<T>(v_); }
  T&& value() && { return std::get<T>(std::move(v_)); }
  T* operator->() { return &value(); }
  const T* operator->() const { return &value(); }
  T& operator*() { return value(); }

 private:
  std::variant<T, Status> v_;
};

}  // namespace envelopefs

#define ENVELOPEFS_RETURN_IF_ERROR(expr)           \
  do {                                             \
    ::envelopefs::Status _st = (expr);             \
    if (!_st.ok()) return _st;                     \
  } while (0)
