#!/usr/bin/env bash
# A root-key program for the exec: provider (keyhierarchy/exec_provider.h), used by the tests:
# the root is an RSA key pair in DIR (root.pem, root.pub.pem, made with `openssl genpkey`);
# a wrap is RSA-OAEP (SHA-256) under the public key with the wrap context as the OAEP label,
# so a wrapped key does not unwrap under another context.
#   exec_root_rsa.sh wrap|unwrap DIR   (the URI: exec:/PATH/exec_root_rsa.sh?DIR)
# Exit codes as the protocol has them: 77 the private key is gone (access denied), 65 the
# wrapped value does not decrypt (authentication failed), 75 DIR itself is missing (unreachable).
set -uo pipefail
op=${1:-}
dir=${2:-}
[[ -d $dir ]] || { echo "key directory '$dir' is not there" >&2; exit 75; }
label=$(printf %s "${ENVELOPEFS_CONTEXT:-}" | base64 -d | od -An -v -tx1 | tr -d ' \n')
[[ -n $label ]] || { echo "no wrap context" >&2; exit 64; }
oaep=(-pkeyopt rsa_padding_mode:oaep -pkeyopt rsa_oaep_md:sha256 -pkeyopt "rsa_oaep_label:$label")
case $op in
  wrap)
    base64 -d | openssl pkeyutl -encrypt -pubin -inkey "$dir/root.pub.pem" "${oaep[@]}" | base64 -w0 ||
      exit 70 ;;
  unwrap)
    [[ -e $dir/root.pem ]] || { echo "the private key is gone" >&2; exit 77; }
    base64 -d | openssl pkeyutl -decrypt -inkey "$dir/root.pem" "${oaep[@]}" 2>/dev/null | base64 -w0 ||
      { echo "OAEP decoding failed" >&2; exit 65; } ;;
  *)
    echo "usage: $0 wrap|unwrap DIR" >&2; exit 64 ;;
esac
