#include "keyhierarchy/exec_provider.h"

#include <fcntl.h>
#include <openssl/evp.h>
#include <poll.h>
#include <signal.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <sysexits.h>
#include <unistd.h>

#include <cerrno>
#include <charconv>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <vector>

extern char** environ;

namespace envelopefs {
namespace {

constexpr int kDefaultTimeout = 30;
constexpr int kMaxTimeout = 3600;
// Far more than any wrapped key (an RSA-4096 block is 684 characters of base64); a program that
// writes more is not speaking the protocol. Small enough that what we store, written back to
// the program as its next unwrap's input, fits an empty pipe (64 KiB) in one write.
constexpr size_t kMaxOutput = 16 * 1024;
// How much of the program's stderr a message quotes: its last line, this long at most.
constexpr size_t kQuoted = 200;
// The program's own descriptors: stdin/stdout/stderr, then itself (a script's interpreter opens
// it as /dev/fd/3), then the pipe that reports a failed exec.
constexpr int kProgramFd = 3;
constexpr int kExecErrorFd = 4;

// Seconds a run may take: ENVELOPEFS_EXEC_TIMEOUT (1..3600) for a slow service, else 30.
int timeout_seconds() {
  const char* v = std::getenv("ENVELOPEFS_EXEC_TIMEOUT");
  if (v == nullptr || *v == '\0') return kDefaultTimeout;
  int n = 0;
  auto [end, ec] = std::from_chars(v, v + std::strlen(v), n);
  if (ec != std::errc() || *end != '\0' || n < 1 || n > kMaxTimeout) return kDefaultTimeout;
  return n;
}

// base64 of `in` and a newline, built in locked memory: for a wrap, `in` is the key.
SecretBytes encode_line(ByteView in) {
  SecretBytes line((in.size() + 2) / 3 * 4 + 2);  // EVP_EncodeBlock adds a NUL
  int n = EVP_EncodeBlock(line.data(), in.data(), static_cast<int>(in.size()));
  line.data()[n] = '\n';
  SecretBytes exact(line.data(), static_cast<size_t>(n) + 1);
  return exact;
}

// The program's base64 answer, whitespace dropped, decoded into locked memory.
bool decode_answer(const uint8_t* text, size_t size, SecretBytes* out) {
  SecretBytes compact(size + 1);
  size_t n = 0;
  for (size_t i = 0; i < size; ++i) {
    if (text[i] != ' ' && text[i] != '\n' && text[i] != '\r' && text[i] != '\t')
      compact.data()[n++] = text[i];
  }
  if (n == 0 || n % 4 != 0) return false;
  size_t padding = (compact.data()[n - 1] == '=') + (n > 1 && compact.data()[n - 2] == '=');
  SecretBytes raw(n / 4 * 3);
  if (EVP_DecodeBlock(raw.data(), compact.data(), static_cast<int>(n)) < 0) return false;
  *out = SecretBytes(raw.data(), raw.size() - padding);
  return true;
}

// The last non-empty line of what the program said on stderr, printable and short: the
// program's own explanation ("AccessDeniedException: ...") belongs in our message.
std::string last_line(const std::string& err) {
  size_t end = err.find_last_not_of(" \n\r\t");
  if (end == std::string::npos) return "";
  size_t begin = err.rfind('\n', end);
  begin = begin == std::string::npos ? 0 : begin + 1;
  std::string line = err.substr(begin, std::min(end + 1 - begin, kQuoted));
  for (char& c : line) {
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) c = '?';
  }
  return line;
}

// Opens the program for execution and checks that nobody but root and the user can change it.
Result<int> open_program(const std::string& path) {
  int fd = open(path.c_str(), O_PATH | O_CLOEXEC);
  if (fd < 0)
    return Status(Code::kUnreachable, "cannot open key command " + path + ": " + std::strerror(errno));
  struct stat st;
  if (fstat(fd, &st) != 0) {
    int err = errno;
    close(fd);
    return Status(Code::kUnreachable, "cannot stat key command " + path + ": " + std::strerror(err));
  }
  std::string problem;
  if (!S_ISREG(st.st_mode)) {
    problem = "is not a regular file";
  } else if ((st.st_mode & 0111) == 0) {
    problem = "is not executable";
  } else if ((st.st_mode & 022) != 0) {
    problem = "can be changed by group or others (chmod go-w " + path + ")";
  } else if (st.st_uid != 0 && st.st_uid != geteuid()) {
    problem = "is owned by another user";
  }
  if (!problem.empty()) {
    close(fd);
    return Status(Code::kInvalidArgument, "key command " + path + " " + problem);
  }
  return fd;
}

struct Run {
  int timeout = 0;  // seconds
  int wait_status = 0;
  bool timed_out = false;
  bool too_long = false;
  int exec_errno = 0;
  SecretBytes out{kMaxOutput};
  size_t out_size = 0;
  std::string err;
};

// In the child, between fork and exec: only async-signal-safe calls, on what the parent built.
[[noreturn]] void exec_child(int program, int in, int out, int err, int exec_error, char* const* argv,
                             char* const* envp) {
  sigset_t none;
  sigemptyset(&none);
  sigprocmask(SIG_SETMASK, &none, nullptr);
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  sigaction(SIGPIPE, &dfl, nullptr);  // the daemon ignores it; the program should not inherit that
  setpgid(0, 0);                      // its own group, so a timeout kills what it started too
  // Every source moved above the targets first, so that no dup2 below overwrites a source
  // (or is a no-op that keeps close-on-exec, when a caller started with 0-2 closed).
  const int from[] = {in, out, err, program, exec_error};
  const int to[] = {0, 1, 2, kProgramFd, kExecErrorFd};
  int moved[5];
  for (int i = 0; i < 5; ++i) {
    moved[i] = fcntl(from[i], F_DUPFD, 10);
    if (moved[i] < 0) _exit(127);
  }
  for (int i = 0; i < 5; ++i) {
    if (dup2(moved[i], to[i]) < 0) _exit(127);
  }
  if (fcntl(kExecErrorFd, F_SETFD, FD_CLOEXEC) < 0 ||
      syscall(SYS_close_range, kExecErrorFd + 1, ~0U, 0) != 0) {
    _exit(127);
  }
  syscall(SYS_execveat, kProgramFd, "", argv, envp, AT_EMPTY_PATH);
  int why = errno;
  (void)!write(kExecErrorFd, &why, sizeof why);
  _exit(127);
}

void close_fd(int* fd) {
  if (*fd >= 0) close(*fd);
  *fd = -1;
}

Result<Run> run_program(const std::string& path, const std::vector<std::string>& args, ByteView context,
                        const SecretBytes& input) {
  auto program = open_program(path);
  if (!program.ok()) return program.status();

  std::vector<std::string> env_text;
  for (char** e = environ; e && *e; ++e) {
    if (std::strncmp(*e, "ENVELOPEFS_CONTEXT=", 19) != 0 &&
        std::strncmp(*e, "ENVELOPEFS_EXEC_PROTOCOL=", 25) != 0) {
      env_text.emplace_back(*e);
    }
  }
  env_text.push_back("ENVELOPEFS_CONTEXT=" + base64_encode(context));
  env_text.push_back("ENVELOPEFS_EXEC_PROTOCOL=1");
  std::vector<char*> envp, argv;
  for (std::string& s : env_text) envp.push_back(s.data());
  envp.push_back(nullptr);
  std::vector<std::string> arg_text = args;
  for (std::string& s : arg_text) argv.push_back(s.data());
  argv.push_back(nullptr);

  int in[2] = {-1, -1}, out[2] = {-1, -1}, err[2] = {-1, -1}, ex[2] = {-1, -1};
  auto close_all = [&] {
    for (int* fd : {&in[0], &in[1], &out[0], &out[1], &err[0], &err[1], &ex[0], &ex[1]}) close_fd(fd);
    close(*program);
  };
  if (pipe2(in, O_CLOEXEC) != 0 || pipe2(out, O_CLOEXEC) != 0 || pipe2(err, O_CLOEXEC) != 0 ||
      pipe2(ex, O_CLOEXEC) != 0) {
    int e = errno;
    close_all();
    return Status::Io(e, "cannot make pipes for key command " + path);
  }
  // A program that exits without reading its input must not kill us with SIGPIPE: blocked
  // here, and a pending one is taken back below.
  sigset_t pipe_only, before;
  sigemptyset(&pipe_only);
  sigaddset(&pipe_only, SIGPIPE);
  pthread_sigmask(SIG_BLOCK, &pipe_only, &before);

  pid_t pid = fork();
  if (pid == 0) exec_child(*program, in[0], out[1], err[1], ex[1], argv.data(), envp.data());
  if (pid < 0) {
    int e = errno;
    pthread_sigmask(SIG_SETMASK, &before, nullptr);
    close_all();
    return Status::Io(e, "cannot start key command " + path);
  }
  close_fd(&in[0]);
  close_fd(&out[1]);
  close_fd(&err[1]);
  close_fd(&ex[1]);

  Run run;
  // The input is a key or a stored answer (at most kMaxOutput, ExecProvider::unwrap) as base64:
  // one write into the empty pipe, which holds 64 KiB, cannot block even if the program never
  // reads it.
  (void)!write(in[1], input.data(), input.size());
  close_fd(&in[1]);

  run.timeout = timeout_seconds();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(run.timeout);
  char err_buf[4096];
  while (out[0] >= 0 || err[0] >= 0) {
    auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - std::chrono::steady_clock::now());
    if (left.count() <= 0) {
      run.timed_out = true;
      break;
    }
    pollfd fds[2] = {{out[0], POLLIN, 0}, {err[0], POLLIN, 0}};
    int n = poll(fds, 2, static_cast<int>(left.count()));
    if (n < 0 && errno != EINTR) break;
    if (n <= 0) continue;
    if (out[0] >= 0 && fds[0].revents) {
      if (run.out_size == kMaxOutput) {
        run.too_long = true;
        break;
      }
      ssize_t got = read(out[0], run.out.data() + run.out_size, kMaxOutput - run.out_size);
      if (got > 0) run.out_size += static_cast<size_t>(got);
      if (got == 0 || (got < 0 && errno != EINTR)) close_fd(&out[0]);
    }
    if (err[0] >= 0 && fds[1].revents) {
      ssize_t got = read(err[0], err_buf, sizeof err_buf);
      if (got > 0) {
        run.err.append(err_buf, static_cast<size_t>(got));
        if (run.err.size() > 2 * sizeof err_buf) run.err.erase(0, run.err.size() - sizeof err_buf);
      }
      if (got == 0 || (got < 0 && errno != EINTR)) close_fd(&err[0]);
    }
  }
  if (run.timed_out || run.too_long) {
    kill(-pid, SIGKILL);
    kill(pid, SIGKILL);
  }
  while (waitpid(pid, &run.wait_status, 0) < 0 && errno == EINTR) {
  }
  if (read(ex[0], &run.exec_errno, sizeof run.exec_errno) != static_cast<ssize_t>(sizeof run.exec_errno)) {
    run.exec_errno = 0;
  }
  sigset_t pending;
  sigpending(&pending);
  if (sigismember(&pending, SIGPIPE) && !sigismember(&before, SIGPIPE)) {
    timespec zero{};
    sigtimedwait(&pipe_only, nullptr, &zero);
  }
  pthread_sigmask(SIG_SETMASK, &before, nullptr);
  close_all();
  return run;
}

class ExecProvider final : public RootKeyProvider {
 public:
  ExecProvider(std::string path, std::string arg) : path_(std::move(path)), arg_(std::move(arg)) {}
  std::string uri() const override { return "exec:" + path_ + (arg_.empty() ? "" : "?" + arg_); }
  std::string describe() const override {
    return "external key command " + path_ + (arg_.empty() ? "" : " (argument " + arg_ + ")");
  }

  Result<Bytes> wrap(const SecretBytes& key, ByteView context) override {
    auto out = ask("wrap", key.view(), context);
    if (!out.ok()) return out.status();
    return Bytes(out->data(), out->data() + out->size());
  }
  Result<SecretBytes> unwrap(ByteView wrapped, ByteView context) override {
    // What we stored is at most an answer long, so its line fits an empty pipe (run_program's
    // one write). A longer one came from an edited config: refused, not written to a program
    // that may never read it.
    if (wrapped.size() > kMaxOutput) {
      return Status(Code::kCorrupt, "wrapped key of " + std::to_string(wrapped.size()) +
                                        " bytes: longer than any answer of key command " + path_);
    }
    return ask("unwrap", wrapped, context);
  }

 private:
  Result<SecretBytes> ask(const char* op, ByteView input, ByteView context) {
    std::vector<std::string> args = {path_, op};
    if (!arg_.empty()) args.push_back(arg_);
    auto run = run_program(path_, args, context, encode_line(input));
    if (!run.ok()) return run.status();
    const std::string who = "key command " + path_ + " (" + op + ")";
    const std::string said = last_line(run->err);
    const std::string quote = said.empty() ? "" : ": " + said;
    if (run->exec_errno != 0) {
      return Status(Code::kUnreachable,
                    "cannot run key command " + path_ + ": " + std::strerror(run->exec_errno));
    }
    if (run->timed_out) {
      return Status(Code::kUnreachable,
                    who + " did not answer within " + std::to_string(run->timeout) + " s and was killed");
    }
    if (run->too_long) return Status(Code::kCorrupt, who + " wrote more than 16 KiB; killed");
    const int ws = run->wait_status;
    if (WIFSIGNALED(ws)) {
      return Status(Code::kUnreachable,
                    who + " was killed by signal " + std::to_string(WTERMSIG(ws)) + quote);
    }
    const int code = WEXITSTATUS(ws);
    if (code == EX_NOPERM) return Status(Code::kAccessDenied, who + " refused" + quote);
    if (code == EX_DATAERR) {
      return Status(Code::kAuthFailed, who + ": the wrapped key did not authenticate" + quote);
    }
    if (code != 0)
      return Status(Code::kUnreachable, who + " failed with exit status " + std::to_string(code) + quote);
    SecretBytes answer;
    if (!decode_answer(run->out.data(), run->out_size, &answer)) {
      return Status(Code::kCorrupt, who + " did not answer with base64 on its standard output");
    }
    return answer;
  }

  std::string path_;
  std::string arg_;
};

}  // namespace

Result<std::unique_ptr<RootKeyProvider>> make_exec_provider(const std::string& uri) {
  std::string rest = uri.substr(uri.find(':') + 1);
  size_t q = rest.find('?');
  std::string path = rest.substr(0, q);
  std::string arg = q == std::string::npos ? "" : rest.substr(q + 1);
  if (path.empty() || path[0] != '/') {
    return Status(Code::kInvalidArgument,
                  "exec: needs the absolute path of the key command, got '" + path + "'");
  }
  if (path.find('\0') != std::string::npos || arg.find('\0') != std::string::npos) {
    return Status(Code::kInvalidArgument, "exec: URI holds a NUL byte");
  }
  // Checked now so that init and mount name a bad program at once; each run checks again.
  auto fd = open_program(path);
  if (!fd.ok()) return fd.status();
  close(*fd);
  return std::unique_ptr<RootKeyProvider>(new ExecProvider(path, arg));
}

}  // namespace envelopefs
