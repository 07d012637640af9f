// The libfuse low-level operation table for a Filesystem.
#pragma once

#define FUSE_USE_VERSION 312
#include <fuse_lowlevel.h>

namespace envelopefs {

class Filesystem;
// All handlers in one table; userdata of the session must be the Filesystem.
const fuse_lowlevel_ops& fuse_operations();
// The session the handlers send notifications on (set once it exists, before it serves).
void set_notification_session(fuse_session* se);

}  // namespace envelopefs
