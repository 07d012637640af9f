// exec:/ABSOLUTE/PATH[?ARG] — the root key is held wherever an external program reaches: a
// cloud KMS's command-line client, Vault's transit engine, a site's own HSM client. envelopefs
// runs the program for every wrap and unwrap; the program does the wrapping, and the root key
// never enters envelopefs.
//
// The protocol (version 1; keyhierarchy/KEYS.md has it with an example):
//   argv   PATH wrap [ARG]   or   PATH unwrap [ARG]        (ARG: the URI's text after '?')
//   env    ENVELOPEFS_CONTEXT=<base64 of the wrap context>, ENVELOPEFS_EXEC_PROTOCOL=1,
//          and the caller's own environment
//   stdin  one line: base64 of the input (the key to wrap, or the wrapped value)
//   stdout base64 of the output; whitespace is ignored
//   exit   0 done; 77 (EX_NOPERM) access denied; 65 (EX_DATAERR) authentication failed;
//          anything else, a signal, or no answer within 30 s (ENVELOPEFS_EXEC_TIMEOUT=N to
//          change): the key service is unreachable
// The program must bind the context to the wrap (an encryption context, GCM or OAEP label),
// so that a wrapped key copied to another volume or version does not unwrap.
//
// Key material goes through the program's stdin or stdout only (a pipe), never its argv or
// environment, which other users can read in /proc. Each run opens the program, checks it (a
// regular, executable file that neither group nor others can write, owned by root or the
// user) and executes that descriptor, so a file swapped in after the check is not run.
#pragma once

#include "keyhierarchy/root_provider.h"

namespace envelopefs {

Result<std::unique_ptr<RootKeyProvider>> make_exec_provider(const std::string& uri);

}  // namespace envelopefs
