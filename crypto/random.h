// CSPRNG (OpenSSL's DRBG) with checked errors, plus the batched per-block key source.
#pragma once

#include "crypto/bytes.h"
#include "crypto/status.h"

namespace envelopefs {

Status random_fill(MutByteView out);

// Fills `key` (32 bytes) with a fresh random key drawn from a per-thread batch kept in locked
// memory: RAND_bytes costs ~1.2 us per call but ~15 ns per key when drawn 2 KiB at a time.
// Consumed bytes of the batch are zeroized as they are handed out.
Status random_block_key(MutByteView key);

}  // namespace envelopefs
