/*
 * gw_budget.h - process-wide memory budgets for buffered bytes that come
 * from outside: request bodies a worker keeps in memory (aggregate routes
 * that forward or template them), and backend answers an aggregate call
 * buffers before parsing. Without a budget, 10,000 connections each sending
 * a 1 MiB body hold 10 GiB; with one, the request past the budget is
 * refused (503) and the process stays within "memory".
 *
 * One atomic counter per budget, shared by every worker: a take is a
 * compare-and-swap loop that never goes past the limit even for a moment.
 * The limit is set by the main thread at start and by a reload; a lower
 * limit does not take back what is held, it only refuses new takes until
 * the use drops below it.
 *
 * Ownership rule: whoever took n bytes gives back exactly n, once, on every
 * path that ends the buffer's life (request end, connection death, cancel).
 */
#ifndef GW_BUDGET_H
#define GW_BUDGET_H

#include "gw_core.h"

typedef struct {
    size_t used;  /* atomic */
    size_t limit; /* atomic; 0: nothing may be buffered */
    uint64_t refused; /* atomic: takes refused, for /metrics */
} gw_budget_t;

/* Request bodies held in memory ("memory.request_body_bytes"). */
extern gw_budget_t gw_budget_bodies;
/* Backend answers buffered by aggregate calls ("memory.response_body_bytes"). */
extern gw_budget_t gw_budget_responses;

void gw_budget_set_limit(gw_budget_t *b, size_t limit);
/* Takes n bytes: true when used + n stays within the limit (then the caller
 * owes gw_budget_give(b, n)); false, counted as refused, otherwise. */
bool gw_budget_take(gw_budget_t *b, size_t n);
/* Gives back n bytes taken earlier. */
void gw_budget_give(gw_budget_t *b, size_t n);
size_t gw_budget_used(const gw_budget_t *b);
size_t gw_budget_limit(const gw_budget_t *b);
uint64_t gw_budget_refused(const gw_budget_t *b);

#endif
