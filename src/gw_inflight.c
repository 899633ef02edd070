/*
 * gw_inflight.c - the global in-flight request counter (see gw_inflight.h).
 * Process-wide mutable state, deliberately outside the configuration: a
 * reload must neither reset the count of requests still running nor let
 * them be counted twice.
 */
#include "gw_inflight.h"

static unsigned inflight; /* atomic */

bool
gw_inflight_acquire(unsigned max)
{
    unsigned cur = __atomic_load_n(&inflight, __ATOMIC_RELAXED);
    do {
        if (cur >= max)
            return false;
    } while (!__atomic_compare_exchange_n(&inflight, &cur, cur + 1, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    return true;
}

void
gw_inflight_release(void)
{
    __atomic_sub_fetch(&inflight, 1, __ATOMIC_RELAXED);
}

unsigned
gw_inflight_current(void)
{
    return __atomic_load_n(&inflight, __ATOMIC_RELAXED);
}
