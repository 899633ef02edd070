/*
 * gw_breaker.c - circuit breakers of backends (see gw_breaker.h).
 *
 * One mutex per breaker guards its whole state; every function holds it
 * for a handful of instructions. A closed breaker is checked without it
 * (an atomic load of the state): the common path of admit() costs no lock.
 * done() takes it to count the outcome. Log lines about state changes are
 * formatted after the lock is released (gw_log formats and copies a line).
 *
 * The sliding window is a ring of WINDOW_BUCKETS buckets of window_ms /
 * WINDOW_BUCKETS each; a bucket carries the number of its time slice, so a
 * stale one is recognised and reset when its slot comes round again.
 */
#include "gw_breaker.h"
#include "gw_config.h"
#include "gw_log.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define WINDOW_BUCKETS 10

typedef struct {
    uint64_t slice; /* now_ms / bucket width, when it was last written */
    unsigned ok, failed;
} bucket_t;

struct gw_breaker_s {
    int refcnt; /* atomic */
    char *name;
    gw_breaker_conf_t conf;
    pthread_mutex_t mu;
    int state;              /* gw_breaker_state_t; atomic loads outside mu */
    uint64_t open_until_ms; /* while open */
    unsigned trips_in_row;  /* trips since it last closed: the open time doubles with each */
    uint64_t trips;
    unsigned consecutive;  /* failures in a row (closed) */
    unsigned probes_taken; /* half-open: admitted probes (given back by abandon) */
    unsigned probes_out;   /* half-open: probes not answered yet */
    unsigned probes_ok;
    uint64_t bucket_ms;
    bucket_t ring[WINDOW_BUCKETS];
};

/* What a locked section decided to log, after the lock is released. */
typedef struct {
    int level; /* 0: nothing */
    char msg[256];
} note_t;

static void
note_flush(const gw_breaker_t *br, const note_t *n)
{
    if (n->level)
        gw_log_rl((gw_log_level_t)n->level, "backend %s: circuit breaker %s", br->name, n->msg);
}

gw_breaker_t *
gw_breaker_new(const char *name, const gw_breaker_conf_t *conf)
{
    gw_breaker_t *br = gw_calloc(1, sizeof(gw_breaker_t));
    br->refcnt = 1;
    br->name = gw_strdup(name);
    br->conf = *conf;
    br->bucket_ms = (uint64_t)conf->window_ms / WINDOW_BUCKETS;
    if (br->bucket_ms == 0)
        br->bucket_ms = 1;
    pthread_mutex_init(&br->mu, NULL);
    br->state = GW_BREAKER_CLOSED;
    return br;
}

gw_breaker_t *
gw_breaker_ref(gw_breaker_t *br)
{
    __atomic_add_fetch(&br->refcnt, 1, __ATOMIC_RELAXED);
    return br;
}

void
gw_breaker_unref(gw_breaker_t *br)
{
    if (br == NULL || __atomic_sub_fetch(&br->refcnt, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    pthread_mutex_destroy(&br->mu);
    free(br->name);
    free(br);
}

const char *
gw_breaker_state_name(gw_breaker_state_t s)
{
    switch (s) {
    case GW_BREAKER_OPEN: return "open";
    case GW_BREAKER_HALF_OPEN: return "half_open";
    default: return "closed";
    }
}

bool
gw_breaker_conf_equal(const gw_breaker_conf_t *a, const gw_breaker_conf_t *b)
{
    return a->consecutive_failures == b->consecutive_failures && a->failure_ratio == b->failure_ratio &&
           a->window_ms == b->window_ms && a->min_requests == b->min_requests && a->open_ms == b->open_ms &&
           a->max_open_ms == b->max_open_ms && a->probe_requests == b->probe_requests;
}

/* --- under the lock ------------------------------------------------------ */

static void
window_reset(gw_breaker_t *br)
{
    memset(br->ring, 0, sizeof(br->ring));
}

static void
window_add(gw_breaker_t *br, uint64_t now, bool ok)
{
    uint64_t slice = now / br->bucket_ms;
    bucket_t *bk = &br->ring[slice % WINDOW_BUCKETS];
    if (bk->slice != slice) {
        bk->slice = slice;
        bk->ok = bk->failed = 0;
    }
    if (ok)
        bk->ok++;
    else
        bk->failed++;
}

static void
window_sum(const gw_breaker_t *br, uint64_t now, unsigned *total, unsigned *failed)
{
    uint64_t slice = now / br->bucket_ms;
    *total = *failed = 0;
    for (size_t i = 0; i < WINDOW_BUCKETS; i++) {
        const bucket_t *bk = &br->ring[i];
        if (bk->slice + WINDOW_BUCKETS <= slice || bk->slice > slice)
            continue; /* older than the window (or never written) */
        *total += bk->ok + bk->failed;
        *failed += bk->failed;
    }
}

/* Opens the circuit: for open_ms, doubled per trip in a row, up to max_open_ms. */
static void
trip(gw_breaker_t *br, uint64_t now, note_t *n, const char *why)
{
    uint64_t ms = (uint64_t)br->conf.open_ms;
    for (unsigned k = 0; k < br->trips_in_row && ms < (uint64_t)br->conf.max_open_ms; k++)
        ms *= 2;
    if (ms > (uint64_t)br->conf.max_open_ms)
        ms = (uint64_t)br->conf.max_open_ms;
    br->trips_in_row++;
    br->trips++;
    br->open_until_ms = now + ms;
    br->consecutive = 0;
    br->probes_taken = br->probes_out = br->probes_ok = 0;
    window_reset(br);
    __atomic_store_n(&br->state, GW_BREAKER_OPEN, __ATOMIC_RELEASE);
    n->level = GW_LOG_WARN;
    snprintf(n->msg, sizeof(n->msg), "opened for %llu ms: %s (trip %u in a row)", (unsigned long long)ms, why,
             br->trips_in_row);
}

static void
close_circuit(gw_breaker_t *br, note_t *n)
{
    br->trips_in_row = 0;
    br->consecutive = 0;
    br->probes_taken = br->probes_out = br->probes_ok = 0;
    window_reset(br);
    __atomic_store_n(&br->state, GW_BREAKER_CLOSED, __ATOMIC_RELEASE);
    n->level = GW_LOG_NOTICE;
    snprintf(n->msg, sizeof(n->msg), "closed: %u probe%s succeeded", br->conf.probe_requests,
             br->conf.probe_requests == 1 ? "" : "s");
}

/* How long a caller turned away should wait (under the lock). */
static int
wait_ms(const gw_breaker_t *br, uint64_t now)
{
    if (br->state == GW_BREAKER_OPEN && br->open_until_ms > now)
        return (int)(br->open_until_ms - now);
    if (br->state == GW_BREAKER_CLOSED)
        return 0;
    return 1000; /* half-open, probes taken: their answers decide; ask again in a second */
}

/* --- the API ------------------------------------------------------------- */

int
gw_breaker_admit(const gw_backend_t *b, int *retry_after_ms)
{
    gw_breaker_t *br = b->breaker;
    if (retry_after_ms)
        *retry_after_ms = 0;
    if (br == NULL || __atomic_load_n(&br->state, __ATOMIC_ACQUIRE) == GW_BREAKER_CLOSED)
        return GW_OK;
    uint64_t now = gw_now_ms();
    int rc = GW_AGAIN;
    note_t n = {0, ""};
    pthread_mutex_lock(&br->mu);
    if (br->state == GW_BREAKER_OPEN && now >= br->open_until_ms) {
        /* every store of state is atomic: other workers load it without mu */
        __atomic_store_n(&br->state, GW_BREAKER_HALF_OPEN, __ATOMIC_RELEASE);
        br->probes_taken = br->probes_out = br->probes_ok = 0;
        n.level = GW_LOG_INFO;
        snprintf(n.msg, sizeof(n.msg), "half-open: letting %u probe%s through", br->conf.probe_requests,
                 br->conf.probe_requests == 1 ? "" : "s");
    }
    if (br->state == GW_BREAKER_CLOSED) {
        rc = GW_OK;
    } else if (br->state == GW_BREAKER_HALF_OPEN && br->probes_taken < br->conf.probe_requests) {
        br->probes_taken++;
        br->probes_out++;
        rc = GW_OK;
    }
    if (rc != GW_OK && retry_after_ms)
        *retry_after_ms = wait_ms(br, now);
    pthread_mutex_unlock(&br->mu);
    note_flush(br, &n);
    return rc;
}

void
gw_breaker_done(const gw_backend_t *b, bool ok)
{
    gw_breaker_t *br = b->breaker;
    if (br == NULL)
        return;
    uint64_t now = gw_now_ms();
    note_t n = {0, ""};
    pthread_mutex_lock(&br->mu);
    switch (br->state) {
    case GW_BREAKER_CLOSED:
        if (br->conf.failure_ratio > 0)
            window_add(br, now, ok);
        if (ok) {
            br->consecutive = 0;
            break;
        }
        br->consecutive++;
        if (br->conf.consecutive_failures && br->consecutive >= br->conf.consecutive_failures) {
            char why[64];
            snprintf(why, sizeof(why), "%u consecutive failures", br->consecutive);
            trip(br, now, &n, why);
        } else if (br->conf.failure_ratio > 0) {
            unsigned total, failed;
            window_sum(br, now, &total, &failed);
            if (total >= br->conf.min_requests && (double)failed > br->conf.failure_ratio * (double)total) {
                char why[128];
                snprintf(why, sizeof(why), "%u of %u calls failed in %d ms (failure_ratio %g)", failed, total,
                         br->conf.window_ms, br->conf.failure_ratio);
                trip(br, now, &n, why);
            }
        }
        break;
    case GW_BREAKER_HALF_OPEN:
        if (br->probes_out == 0)
            break; /* a late answer to a call admitted before it opened (no probe outstanding) */
        br->probes_out--;
        if (!ok) {
            trip(br, now, &n, "a half-open probe failed");
        } else if (++br->probes_ok >= br->conf.probe_requests) {
            close_circuit(br, &n);
        }
        break;
    default: break; /* open: late answers of calls admitted before it opened */
    }
    pthread_mutex_unlock(&br->mu);
    note_flush(br, &n);
}

void
gw_breaker_abandon(const gw_backend_t *b)
{
    gw_breaker_t *br = b->breaker;
    if (br == NULL || __atomic_load_n(&br->state, __ATOMIC_ACQUIRE) != GW_BREAKER_HALF_OPEN)
        return;
    pthread_mutex_lock(&br->mu);
    if (br->state == GW_BREAKER_HALF_OPEN && br->probes_out > 0) {
        br->probes_out--;
        br->probes_taken--;
    }
    pthread_mutex_unlock(&br->mu);
}

int
gw_breaker_retry_after(const gw_backend_t *b)
{
    gw_breaker_t *br = b->breaker;
    if (br == NULL || __atomic_load_n(&br->state, __ATOMIC_ACQUIRE) == GW_BREAKER_CLOSED)
        return 0;
    uint64_t now = gw_now_ms();
    pthread_mutex_lock(&br->mu);
    int ms = wait_ms(br, now);
    if (ms == 0 && br->state == GW_BREAKER_OPEN)
        ms = 1; /* due for half-open: the next admit() decides */
    pthread_mutex_unlock(&br->mu);
    return ms;
}

int
gw_breaker_retry_after_s(const gw_backend_t *b)
{
    int ms = gw_breaker_retry_after(b);
    int s = (ms + 999) / 1000;
    return s < 1 ? 1 : s;
}

bool
gw_breaker_stats(const gw_backend_t *b, gw_breaker_stats_t *out)
{
    gw_breaker_t *br = b->breaker;
    memset(out, 0, sizeof(*out));
    if (br == NULL)
        return false;
    uint64_t now = gw_now_ms();
    pthread_mutex_lock(&br->mu);
    out->state = (gw_breaker_state_t)br->state;
    out->trips = br->trips;
    out->consecutive = br->consecutive;
    out->retry_after_ms = br->state == GW_BREAKER_OPEN ? wait_ms(br, now) : 0;
    pthread_mutex_unlock(&br->mu);
    return true;
}

void
gw_breaker_inherit(gw_config_t *newc, const gw_config_t *oldc)
{
    if (oldc == NULL)
        return;
    for (size_t i = 0; i < newc->nbackends; i++) {
        gw_backend_t *nb = newc->backends[i];
        if (nb->breaker == NULL)
            continue;
        for (size_t k = 0; k < oldc->nbackends; k++) {
            const gw_backend_t *ob = oldc->backends[k];
            if (strcmp(ob->name, nb->name) != 0)
                continue;
            if (ob->breaker && ob->breaker != nb->breaker &&
                gw_breaker_conf_equal(&ob->breaker_conf, &nb->breaker_conf)) {
                gw_breaker_unref(nb->breaker);
                nb->breaker = gw_breaker_ref(ob->breaker);
            }
            break;
        }
    }
}
