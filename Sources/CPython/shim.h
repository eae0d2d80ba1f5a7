// The CPython 3.11 C API for Swift: the system libpython (`pkg-config python3-embed`), as it is.
#ifndef SIDECAR_CPYTHON_SHIM_H
#define SIDECAR_CPYTHON_SHIM_H

// The C library's headers first, with the feature macros Swift's own C modules see. pyconfig.h
// defines _XOPEN_SOURCE and friends, which change some system structs (fd_set's member names);
// included after it, the same struct would differ between this module and Glibc/Dispatch, and
// clang refuses the mismatch. Python's headers then find these already included.
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/select.h>
#include <sys/stat.h>
#include <sys/time.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>
#include <wchar.h>

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#endif
