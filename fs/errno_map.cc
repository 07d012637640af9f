#include "fs/errno_map.h"

#include <cerrno>

#include "fs/log.h"

namespace envelopefs {

int to_errno(const Status& st, const char* what, uint64_t ino) {
  switch (st.code()) {
    case Code::kOk: return 0;
    case Code::kAuthFailed:
    case Code::kCorrupt:
      log_error_rate_limited(std::string(what) + ": inode " + std::to_string(ino) + ": " + st.to_string());
      return EIO;
    case Code::kKeyUnavailable:
    case Code::kAccessDenied: return EKEYREVOKED;
    case Code::kUnreachable: return EKEYREVOKED;
    case Code::kNotFound: return ENOENT;
    case Code::kAlreadyExists: return EEXIST;
    case Code::kNoSpace: return st.sys_errno() ? st.sys_errno() : ENOSPC;
    case Code::kInvalidArgument: return EINVAL;
    case Code::kUnsupported: return EOPNOTSUPP;
    case Code::kIoError: return st.sys_errno() ? st.sys_errno() : EIO;
    case Code::kInternal:
      log_error(std::string(what) + ": inode " + std::to_string(ino) + ": " + st.to_string());
      return EIO;
  }
  return EIO;
}

}  // namespace envelopefs
