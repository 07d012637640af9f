// The libfuse low-level operation table for a Filesystem.
#pragma once

#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>

namespace envelopefs {

class Filesystem;
// All handlers in one table; userdata of the session must be the Filesystem.
const fuse_lowlevel_ops& fuse_operations();

}  // namespace envelopefs
