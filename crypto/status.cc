#include "crypto/status.h"

#include <cerrno>
#include <cstring>

namespace envelopefs {

const char* code_name(Code c) {
  switch (c) {
    case Code::kOk: return "ok";
    case Code::kInvalidArgument: return "invalid argument";
    case Code::kNotFound: return "not found";
    case Code::kAlreadyExists: return "already exists";
    case Code::kAuthFailed: return "authentication failed";
    case Code::kCorrupt: return "corrupt";
    case Code::kUnsupported: return "unsupported";
    case Code::kAccessDenied: return "access denied";
    case Code::kUnreachable: return "key service unreachable";
    case Code::kKeyUnavailable: return "key unavailable";
    case Code::kIoError: return "I/O error";
    case Code::kNoSpace: return "no space";
    case Code::kInternal: return "internal error";
  }
  return "unknown";
}

Status Status::Io(int err, std::string what) {
  std::string msg = std::move(what) + ": " + std::strerror(err);
  if (err == ENOSPC || err == EDQUOT) return Status(Code::kNoSpace, std::move(msg), err);
  return Status(Code::kIoError, std::move(msg), err);
}

std::string Status::to_string() const {
  if (ok()) return "ok";
  return std::string(code_name(code_)) + ": " + message_;
}

}  // namespace envelopefs
