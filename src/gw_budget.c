/*
 * gw_budget.c - process-wide budgets of buffered bytes (see gw_budget.h).
 */
#include "gw_budget.h"
#include "gw_log.h"

gw_budget_t gw_budget_bodies = { 0, 256u << 20, 0 };
gw_budget_t gw_budget_responses = { 0, 512u << 20, 0 };

void
gw_budget_set_limit(gw_budget_t *b, size_t limit)
{
    __atomic_store_n(&b->limit, limit, __ATOMIC_RELAXED);
}

bool
gw_budget_take(gw_budget_t *b, size_t n)
{
    size_t limit = __atomic_load_n(&b->limit, __ATOMIC_RELAXED);
    size_t cur = __atomic_load_n(&b->used, __ATOMIC_RELAXED);
    do {
        if (n > limit || cur > limit - n) {
            __atomic_add_fetch(&b->refused, 1, __ATOMIC_RELAXED);
            return false;
        }
    } while (!__atomic_compare_exchange_n(&b->used, &cur, cur + n, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
    return true;
}

void
gw_budget_give(gw_budget_t *b, size_t n)
{
    size_t before = __atomic_fetch_sub(&b->used, n, __ATOMIC_RELAXED);
    if (before < n) {
        /* a give without its take: a bug; never wrap the counter around */
        __atomic_store_n(&b->used, 0, __ATOMIC_RELAXED);
        gw_log_rl(GW_LOG_ERR, "memory budget: %zu bytes given back but only %zu held", n, before);
    }
}

size_t
gw_budget_used(const gw_budget_t *b)
{
    return __atomic_load_n(&b->used, __ATOMIC_RELAXED);
}

size_t
gw_budget_limit(const gw_budget_t *b)
{
    return __atomic_load_n(&b->limit, __ATOMIC_RELAXED);
}

uint64_t
gw_budget_refused(const gw_budget_t *b)
{
    return __atomic_load_n(&b->refused, __ATOMIC_RELAXED);
}
