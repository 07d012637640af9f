// Every domain-separation label of envelopefs, in one place so none is ever repeated or reused
// for a second purpose. Changing any of these changes the format: bump the format version.
#pragma once

namespace envelopefs::labels {

// HKDF info strings (salt is always the 16-byte volume id).
inline constexpr char kConfigMacKey[] = "envelopefs v1 config mac";      // from the active DEK
inline constexpr char kPageMacKey[] = "envelopefs v1 metadata page mac";  // from each DEK version
inline constexpr char kRootWrapKey[] = "envelopefs v1 root wrap";        // from a file/pass root key

// Associated data prefixes for root-key wraps (followed by the volume id and a purpose).
inline constexpr char kWrapDek[] = "envelopefs v1 wrap dek";
inline constexpr char kWrapNameKey[] = "envelopefs v1 wrap name key";

// Associated data prefix of a data block seal (followed by the fields in fs/FORMAT.md).
inline constexpr char kBlockAad[] = "EFSB";

// Known plaintext sealed by a passphrase-derived root key so a wrong passphrase is reported as
// such rather than as a corrupt config.
inline constexpr char kPassCheck[] = "envelopefs v1 passphrase check";

}  // namespace envelopefs::labels
