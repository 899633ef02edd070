/*
 * gw_retry.c - retry policy, retry budget and backoff (see gw_retry.h).
 *
 * The budget's counters are process-wide atomics in a reference-counted
 * state object: every worker of every configuration that shares it counts
 * into the same numbers, and the object lives until the last configuration
 * pointing to it is freed. Acquiring a slot is an optimistic increment
 * checked against the limit and undone when over it, so concurrent workers
 * can overshoot the limit by nothing: each keeps its increment only when
 * the total it saw was within the limit.
 */
#include "gw_retry.h"
#include "gw_config.h"
#include "gw_http.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct gw_retry_state_s {
    atomic_int refcnt;
    atomic_long requests; /* requests in flight to the backend */
    atomic_long retries;  /* retries and hedges in flight */
    atomic_ullong granted;
    atomic_ullong denied;
};

static gw_retry_state_t *
state_new(void)
{
    gw_retry_state_t *s = gw_calloc(1, sizeof(*s));
    atomic_init(&s->refcnt, 1);
    return s;
}

static gw_retry_state_t *
state_ref(gw_retry_state_t *s)
{
    atomic_fetch_add(&s->refcnt, 1);
    return s;
}

static void
state_unref(gw_retry_state_t *s)
{
    if (s && atomic_fetch_sub(&s->refcnt, 1) == 1)
        free(s);
}

gw_retry_conf_t *
gw_retry_conf_new(void)
{
    gw_retry_conf_t *rc = gw_calloc(1, sizeof(*rc));
    rc->attempts = 1;
    rc->backoff_base_ms = 25;
    rc->backoff_cap_ms = 250;
    rc->statuses[0] = 502;
    rc->statuses[1] = 503;
    rc->statuses[2] = 504;
    rc->nstatuses = 3;
    rc->budget_percent = 20;
    rc->min_retries = 3;
    rc->state = state_new();
    return rc;
}

void
gw_retry_conf_free(gw_retry_conf_t *rc)
{
    if (rc == NULL)
        return;
    state_unref(rc->state);
    free(rc);
}

bool
gw_retry_conf_same(const gw_retry_conf_t *a, const gw_retry_conf_t *b)
{
    if (a->enabled != b->enabled || a->attempts != b->attempts || a->backoff_base_ms != b->backoff_base_ms ||
        a->backoff_cap_ms != b->backoff_cap_ms || a->per_try_timeout_ms != b->per_try_timeout_ms ||
        a->nstatuses != b->nstatuses || a->retry_non_idempotent != b->retry_non_idempotent ||
        a->budget_percent != b->budget_percent || a->min_retries != b->min_retries)
        return false;
    return memcmp(a->statuses, b->statuses, a->nstatuses * sizeof(a->statuses[0])) == 0;
}

bool
gw_retry_status(const gw_retry_conf_t *rc, int status)
{
    for (unsigned i = 0; i < rc->nstatuses; i++)
        if (rc->statuses[i] == status)
            return true;
    return false;
}

bool
gw_retry_method_ok(const gw_retry_conf_t *rc, int method)
{
    return gw_http_idempotent(method) || rc->retry_non_idempotent;
}

/* --- the per-thread generator ------------------------------------------- */

/* xorshift64*: each worker thread has its own state, seeded on first use
 * from the clock, the thread and the state's address, so workers never
 * share a sequence and no lock is needed. */
static __thread uint64_t prng;

static uint64_t
prng_next(void)
{
    if (prng == 0) {
        uint64_t seed = gw_now_ns() * 0x9E3779B97F4A7C15ULL ^
                        (uint64_t)(uintptr_t)&prng ^ ((uint64_t)(uintptr_t)pthread_self() << 17);
        prng = seed ? seed : 0x2545F4914F6CDD1DULL;
    }
    prng ^= prng >> 12;
    prng ^= prng << 25;
    prng ^= prng >> 27;
    return prng * 0x2545F4914F6CDD1DULL;
}

uint64_t
gw_retry_random(uint64_t bound)
{
    if (bound == UINT64_MAX)
        return prng_next();
    /* the modulo bias is below 2^-40 for the bounds used here (ms) */
    return prng_next() % (bound + 1);
}

int
gw_retry_backoff_ms(const gw_retry_conf_t *rc, unsigned n)
{
    uint64_t ceil = (uint64_t)rc->backoff_base_ms;
    for (unsigned i = 1; i < n && ceil < (uint64_t)rc->backoff_cap_ms; i++)
        ceil *= 2;
    if (ceil > (uint64_t)rc->backoff_cap_ms)
        ceil = (uint64_t)rc->backoff_cap_ms;
    return (int)gw_retry_random(ceil);
}

/* --- the budget ----------------------------------------------------------- */

void
gw_retry_request_begin(const gw_retry_conf_t *rc)
{
    atomic_fetch_add_explicit(&rc->state->requests, 1, memory_order_relaxed);
}

void
gw_retry_request_end(const gw_retry_conf_t *rc)
{
    atomic_fetch_sub_explicit(&rc->state->requests, 1, memory_order_relaxed);
}

bool
gw_retry_acquire(const gw_retry_conf_t *rc)
{
    gw_retry_state_t *s = rc->state;
    long requests = atomic_load_explicit(&s->requests, memory_order_relaxed);
    long limit = requests * (long)rc->budget_percent / 100;
    if (limit < (long)rc->min_retries)
        limit = (long)rc->min_retries;
    long now = atomic_fetch_add_explicit(&s->retries, 1, memory_order_relaxed) + 1;
    if (now > limit) {
        atomic_fetch_sub_explicit(&s->retries, 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&s->denied, 1, memory_order_relaxed);
        return false;
    }
    atomic_fetch_add_explicit(&s->granted, 1, memory_order_relaxed);
    return true;
}

void
gw_retry_release(const gw_retry_conf_t *rc)
{
    atomic_fetch_sub_explicit(&rc->state->retries, 1, memory_order_relaxed);
}

void
gw_retry_stats(const gw_retry_conf_t *rc, gw_retry_stats_t *out)
{
    gw_retry_state_t *s = rc->state;
    out->requests = atomic_load(&s->requests);
    out->retries = atomic_load(&s->retries);
    out->granted = atomic_load(&s->granted);
    out->denied = atomic_load(&s->denied);
}

void
gw_retry_inherit(gw_config_t *newc, const gw_config_t *oldc)
{
    for (size_t i = 0; i < newc->nbackends; i++) {
        gw_backend_t *nb = newc->backends[i];
        for (size_t k = 0; k < oldc->nbackends; k++) {
            const gw_backend_t *ob = oldc->backends[k];
            if (strcmp(nb->name, ob->name) != 0 || !gw_retry_conf_same(nb->retry, ob->retry))
                continue;
            gw_retry_state_t *fresh = nb->retry->state;
            nb->retry->state = state_ref(ob->retry->state);
            state_unref(fresh);
            break;
        }
    }
}
