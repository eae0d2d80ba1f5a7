// Debian's libhiredis-dev: the Redis client the inbox/outbox speaks through (no hand-written
// protocol client). Only the synchronous API is used, on a dedicated thread per connection.
#include <sys/time.h>
#include <hiredis/hiredis.h>
