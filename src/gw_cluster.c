/*
 * gw_cluster.c - the servers of a backend: balancing, shared per-server
 * state, outlier ejection (see gw_cluster.h).
 *
 * The hot path (pick, inflight, report of a success) uses relaxed atomics
 * and no lock. An ejection decision reads every server of the backend to
 * apply max_ejected_percent, so it is taken under one process-wide mutex:
 * it happens only when a server reaches its failure threshold, rarely.
 */
#include "gw_cluster.h"
#include "gw_config.h"
#include "gw_log.h"
#include "gw_server.h"

#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct gw_hserver_s {
    atomic_int refcnt;
    /* active checks: written by the checker thread, read by every worker */
    atomic_bool healthy;
    atomic_uint check_ok_row;
    atomic_uint check_fail_row;
    /* outlier detection */
    _Atomic uint64_t ejected_until_ms; /* 0: never ejected */
    atomic_uint ejections_in_row;
    atomic_uint consecutive; /* passive failures in a row */
    atomic_int inflight;
    /* counters */
    _Atomic uint64_t requests;
    _Atomic uint64_t failures[GW_FAIL_MAX];
    _Atomic uint64_t ejections;
    _Atomic uint64_t checks[GW_HC_MAX];
};

typedef struct {
    uint64_t h;
    uint32_t si;
} point_t;

/* Worker w's balancer state: a row of stride bytes (a multiple of 64, so
 * two workers never write the same cache line): the random state of
 * least_request, then the round-robin current weights. */
typedef struct {
    uint64_t rng;
    int cw[];
} row_t;

struct gw_cluster_s {
    size_t nservers;
    int workers;
    point_t *ring; /* sorted by h: primaries only */
    size_t nring;
    size_t stride;
    unsigned char *rows;
};

static pthread_mutex_t eject_mu = PTHREAD_MUTEX_INITIALIZER;

/* --- hashing --------------------------------------------------------------- */

uint64_t
gw_cluster_hash(const void *p, size_t len)
{
    const unsigned char *s = p;
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < len; i++) {
        h ^= s[i];
        h *= 0x100000001b3ULL;
    }
    /* murmur3 fmix64 */
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
}

/* --- shared state ------------------------------------------------------------ */

gw_hserver_t *
gw_hserver_new(void)
{
    gw_hserver_t *hs = gw_calloc(1, sizeof(*hs));
    atomic_init(&hs->refcnt, 1);
    atomic_init(&hs->healthy, true);
    return hs;
}

gw_hserver_t *
gw_hserver_ref(gw_hserver_t *hs)
{
    atomic_fetch_add_explicit(&hs->refcnt, 1, memory_order_relaxed);
    return hs;
}

void
gw_hserver_unref(gw_hserver_t *hs)
{
    if (hs == NULL || atomic_fetch_sub_explicit(&hs->refcnt, 1, memory_order_acq_rel) != 1)
        return;
    free(hs);
}

/* --- per-configuration part ------------------------------------------------------ */

static int
point_cmp(const void *a, const void *b)
{
    const point_t *x = a, *y = b;
    if (x->h != y->h)
        return x->h < y->h ? -1 : 1;
    return x->si < y->si ? -1 : x->si > y->si;
}

static void
build_ring(gw_cluster_t *cl, const gw_backend_t *b)
{
    uint64_t total = 0;
    for (size_t i = 0; i < b->nservers; i++)
        if (!b->servers[i].backup)
            total += b->servers[i].weight;
    if (total == 0)
        return;
    /* points per unit of weight: GW_CLUSTER_RING_POINTS, fewer when the ring
     * would exceed GW_CLUSTER_RING_MAX; at least one point per server */
    uint64_t ppu = GW_CLUSTER_RING_POINTS;
    if (ppu * total > GW_CLUSTER_RING_MAX)
        ppu = 0;
    size_t n = 0;
    size_t *np = gw_calloc(b->nservers, sizeof(size_t));
    for (size_t i = 0; i < b->nservers; i++) {
        const gw_peer_t *s = &b->servers[i];
        if (s->backup)
            continue;
        np[i] = ppu ? (size_t)(ppu * s->weight) : (size_t)((uint64_t)s->weight * GW_CLUSTER_RING_MAX / total);
        if (np[i] == 0)
            np[i] = 1;
        n += np[i];
    }
    cl->ring = gw_malloc(n * sizeof(point_t));
    char buf[2100];
    for (size_t i = 0; i < b->nservers; i++) {
        for (size_t k = 0; k < np[i]; k++) {
            /* the URL, so a server keeps its points when others come or go */
            int len = snprintf(buf, sizeof(buf), "%s#%zu", b->servers[i].url, k);
            if (len < 0 || (size_t)len >= sizeof(buf))
                len = (int)sizeof(buf) - 1;
            cl->ring[cl->nring].h = gw_cluster_hash(buf, (size_t)len);
            cl->ring[cl->nring].si = (uint32_t)i;
            cl->nring++;
        }
    }
    free(np);
    qsort(cl->ring, cl->nring, sizeof(point_t), point_cmp);
}

gw_cluster_t *
gw_cluster_new(const gw_backend_t *b, int workers)
{
    gw_cluster_t *cl = gw_calloc(1, sizeof(*cl));
    cl->nservers = b->nservers;
    cl->workers = workers > 0 ? workers : 1;
    cl->stride = (sizeof(row_t) + b->nservers * sizeof(int) + 63) / 64 * 64;
    cl->rows = gw_calloc((size_t)cl->workers, cl->stride);
    for (int w = 0; w < cl->workers; w++) {
        row_t *r = (row_t *)(cl->rows + (size_t)w * cl->stride);
        r->rng = 0x9e3779b97f4a7c15ULL * (uint64_t)(w + 1) ^ (uint64_t)(uintptr_t)cl;
        if (r->rng == 0)
            r->rng = 1;
    }
    if (b->balance == GW_BAL_HASH)
        build_ring(cl, b);
    return cl;
}

void
gw_cluster_free(gw_cluster_t *cl)
{
    if (cl == NULL)
        return;
    free(cl->ring);
    free(cl->rows);
    free(cl);
}

static bool
hc_conf_equal(const gw_hc_conf_t *a, const gw_hc_conf_t *b)
{
    if (a == NULL || b == NULL)
        return a == b;
    if (strcmp(a->path, b->path) != 0 || a->interval_ms != b->interval_ms || a->timeout_ms != b->timeout_ms ||
        a->healthy != b->healthy || a->unhealthy != b->unhealthy || a->nstatuses != b->nstatuses)
        return false;
    for (size_t i = 0; i < a->nstatuses; i++)
        if (a->statuses[i] != b->statuses[i])
            return false;
    return true;
}

bool
gw_cluster_health_conf_equal(const gw_backend_t *a, const gw_backend_t *b)
{
    const gw_outlier_conf_t *x = &a->outlier, *y = &b->outlier;
    if (x->enabled != y->enabled)
        return false;
    if (x->enabled && (x->consecutive_failures != y->consecutive_failures || x->eject_ms != y->eject_ms ||
                       x->max_eject_ms != y->max_eject_ms || x->max_ejected_percent != y->max_ejected_percent))
        return false;
    return hc_conf_equal(a->health_check, b->health_check);
}

void
gw_cluster_inherit(gw_config_t *newc, const gw_config_t *oldc)
{
    if (oldc == NULL)
        return;
    for (size_t i = 0; i < newc->nbackends; i++) {
        gw_backend_t *nb = newc->backends[i];
        const gw_backend_t *ob = NULL;
        for (size_t k = 0; k < oldc->nbackends && ob == NULL; k++)
            if (strcmp(oldc->backends[k]->name, nb->name) == 0)
                ob = oldc->backends[k];
        if (ob == NULL || !gw_cluster_health_conf_equal(nb, ob))
            continue;
        for (size_t s = 0; s < nb->nservers; s++) {
            gw_peer_t *np = &nb->servers[s];
            for (size_t k = 0; k < ob->nservers; k++) {
                const gw_peer_t *op = &ob->servers[k];
                if (strcmp(op->url, np->url) == 0 && op->hs != np->hs) {
                    gw_hserver_unref(np->hs);
                    np->hs = gw_hserver_ref(op->hs);
                    break;
                }
            }
        }
    }
}

/* --- picking ------------------------------------------------------------------- */

bool
gw_cluster_usable(const gw_peer_t *s, uint64_t now_ms)
{
    const gw_hserver_t *hs = s->hs;
    if (!atomic_load_explicit(&hs->healthy, memory_order_relaxed))
        return false;
    return atomic_load_explicit(&hs->ejected_until_ms, memory_order_relaxed) <= now_ms;
}

void
gw_cluster_inflight(const gw_peer_t *s, int delta)
{
    atomic_fetch_add_explicit(&s->hs->inflight, delta, memory_order_relaxed);
}

static row_t *
row_of(const gw_cluster_t *cl, int wid)
{
    if (wid < 0 || wid >= cl->workers)
        wid = 0; /* never happens with a correct caller; stay in bounds */
    return (row_t *)(cl->rows + (size_t)wid * cl->stride);
}

/* xorshift64* */
static uint64_t
rng_next(row_t *r)
{
    uint64_t x = r->rng;
    x ^= x >> 12;
    x ^= x << 25;
    x ^= x >> 27;
    r->rng = x;
    return x * 0x2545f4914f6cdd1dULL;
}

/* nginx's smooth weighted round robin over the servers of mask cand (not 0). */
static unsigned
pick_rr(const gw_backend_t *b, row_t *r, uint32_t cand)
{
    int total = 0;
    int best = -1;
    for (unsigned i = 0; i < b->nservers; i++) {
        if (!(cand & (1u << i)))
            continue;
        int w = (int)b->servers[i].weight;
        r->cw[i] += w;
        total += w;
        if (best < 0 || r->cw[i] > r->cw[best])
            best = (int)i;
    }
    r->cw[best] -= total;
    return (unsigned)best;
}

static unsigned
nth_bit(uint32_t mask, unsigned n)
{
    for (unsigned i = 0; i < 32; i++)
        if ((mask & (1u << i)) && n-- == 0)
            return i;
    return 0;
}

/* Envoy's least request: the better of two distinct random candidates by
 * (in-flight + 1) / weight; equal: the first drawn. */
static unsigned
pick_least(const gw_backend_t *b, row_t *r, uint32_t cand)
{
    unsigned n = (unsigned)__builtin_popcount(cand);
    if (n == 1)
        return nth_bit(cand, 0);
    unsigned x = (unsigned)(rng_next(r) % n);
    unsigned y = (unsigned)(rng_next(r) % (n - 1));
    if (y >= x)
        y++;
    unsigned a = nth_bit(cand, x), c = nth_bit(cand, y);
    uint64_t la = (uint64_t)atomic_load_explicit(&b->servers[a].hs->inflight, memory_order_relaxed) + 1;
    uint64_t lc = (uint64_t)atomic_load_explicit(&b->servers[c].hs->inflight, memory_order_relaxed) + 1;
    /* la / wa <= lc / wc */
    return la * b->servers[c].weight <= lc * b->servers[a].weight ? a : c;
}

/* The first ring point at or after hash (wrapping) whose server is a candidate. */
static int
pick_hash(const gw_cluster_t *cl, uint64_t hash, uint32_t cand)
{
    if (cl->nring == 0)
        return -1;
    size_t lo = 0, hi = cl->nring;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (cl->ring[mid].h < hash)
            lo = mid + 1;
        else
            hi = mid;
    }
    for (size_t k = 0; k < cl->nring; k++) {
        const point_t *p = &cl->ring[(lo + k) % cl->nring];
        if (cand & (1u << p->si))
            return (int)p->si;
    }
    return -1;
}

int
gw_cluster_pick_id(int wid, const gw_backend_t *b, uint64_t hash, bool has_hash, uint32_t tried, uint64_t now_ms,
                   unsigned *si)
{
    const gw_cluster_t *cl = b->cluster;
    row_t *r = row_of(cl, wid);
    uint32_t prim = 0, back = 0;
    for (unsigned i = 0; i < b->nservers; i++) {
        if (!gw_cluster_usable(&b->servers[i], now_ms))
            continue;
        if (b->servers[i].backup)
            back |= 1u << i;
        else
            prim |= 1u << i;
    }
    uint32_t cand = prim & ~tried;
    if (cand == 0)
        cand = prim;
    if (cand == 0) {
        cand = back & ~tried;
        if (cand == 0)
            cand = back;
        if (cand == 0)
            return GW_AGAIN;
        *si = pick_rr(b, r, cand);
        return GW_OK;
    }
    switch (b->balance) {
    case GW_BAL_LEAST: *si = pick_least(b, r, cand); break;
    case GW_BAL_HASH: {
        int h = has_hash ? pick_hash(cl, hash, cand) : -1;
        *si = h >= 0 ? (unsigned)h : pick_rr(b, r, cand);
        break;
    }
    default: *si = pick_rr(b, r, cand); break;
    }
    return GW_OK;
}

int
gw_cluster_pick(gw_worker_t *w, const gw_backend_t *b, uint64_t hash, bool has_hash, uint32_t tried, uint64_t now_ms,
                unsigned *si)
{
    return gw_cluster_pick_id(w->id, b, hash, has_hash, tried, now_ms, si);
}

/* --- outcomes -------------------------------------------------------------------- */

/* Whether a try that ended with code (and status) counts toward ejection. */
static bool
outlier_failure(gw_fail_t code, int status)
{
    switch (code) {
    case GW_FAIL_CONNECT_FAILED:
    case GW_FAIL_RESOLVE_FAILED:
    case GW_FAIL_TLS_FAILED:
    case GW_FAIL_RESET:
    case GW_FAIL_TRUNCATED:
    case GW_FAIL_BAD_RESPONSE:
    case GW_FAIL_TIMEOUT: return true;
    case GW_FAIL_BAD_STATUS: return status >= 500;
    default: return false;
    }
}

/* Local outcomes: decided here, they say nothing about the server. */
static bool
local_outcome(gw_fail_t code)
{
    return code == GW_FAIL_UNAVAILABLE || code == GW_FAIL_QUEUE_FULL || code == GW_FAIL_QUEUE_TIMEOUT ||
           code == GW_FAIL_CIRCUIT_OPEN || code == GW_FAIL_CANCELLED || code == GW_FAIL_POOL_FULL ||
           code == GW_FAIL_MEMORY_BUDGET || code == GW_FAIL_MISSING_VALUE || code == GW_FAIL_INVALID_VALUE ||
           code == GW_FAIL_DEPENDENCY_FAILED;
}

/* s reached its threshold (under eject_mu): eject it unless the cap refuses. */
static void
try_eject(const gw_backend_t *b, const gw_peer_t *s, uint64_t now, unsigned run)
{
    const gw_outlier_conf_t *oc = &b->outlier;
    gw_hserver_t *hs = s->hs;
    char msg[256] = "";
    int level = 0;
    pthread_mutex_lock(&eject_mu);
    uint64_t until = atomic_load_explicit(&hs->ejected_until_ms, memory_order_relaxed);
    if (until > now) {
        pthread_mutex_unlock(&eject_mu); /* ejected already (a late answer) */
        return;
    }
    size_t ejected = 0;
    for (size_t i = 0; i < b->nservers; i++)
        if (atomic_load_explicit(&b->servers[i].hs->ejected_until_ms, memory_order_relaxed) > now)
            ejected++;
    /* Envoy: eject when 100 * (ejected + 1) / n <= max_ejected_percent */
    if (100 * (ejected + 1) > (size_t)oc->max_ejected_percent * b->nservers) {
        level = GW_LOG_NOTICE;
        snprintf(msg, sizeof(msg),
                 "is not ejected after %u failure%s in a row: %zu of %zu servers are ejected "
                 "already (max_ejected_percent %u)",
                 run, run == 1 ? "" : "s", ejected, b->nservers, oc->max_ejected_percent);
    } else {
        unsigned k = atomic_load_explicit(&hs->ejections_in_row, memory_order_relaxed);
        if (until != 0 && now - until > (uint64_t)oc->max_eject_ms)
            k = 0; /* back for longer than max_eject_ms: the doubling starts over */
        uint64_t ms = (uint64_t)oc->eject_ms;
        for (unsigned i = 0; i < k && ms < (uint64_t)oc->max_eject_ms; i++)
            ms *= 2;
        if (ms > (uint64_t)oc->max_eject_ms)
            ms = (uint64_t)oc->max_eject_ms;
        atomic_store_explicit(&hs->ejections_in_row, k + 1, memory_order_relaxed);
        atomic_store_explicit(&hs->ejected_until_ms, now + ms, memory_order_relaxed);
        atomic_fetch_add_explicit(&hs->ejections, 1, memory_order_relaxed);
        level = GW_LOG_WARN;
        snprintf(msg, sizeof(msg), "is ejected for %llu ms: %u failure%s in a row (ejection %u in a row)",
                 (unsigned long long)ms, run, run == 1 ? "" : "s", k + 1);
    }
    atomic_store_explicit(&hs->consecutive, 0, memory_order_relaxed);
    pthread_mutex_unlock(&eject_mu);
    if (level)
        gw_log_rl((gw_log_level_t)level, "backend %s server %s %s", b->name, s->label, msg);
}

void
gw_cluster_report(const gw_backend_t *b, const gw_peer_t *s, gw_fail_t code, int status, uint64_t now_ms)
{
    gw_hserver_t *hs = s->hs;
    if ((unsigned)code >= GW_FAIL_MAX)
        code = GW_FAIL_BAD_RESPONSE;
    atomic_fetch_add_explicit(&hs->requests, 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&hs->failures[code], 1, memory_order_relaxed);
    if (local_outcome(code))
        return;
    if (!outlier_failure(code, status)) {
        /* a load first: a store to a shared line on every success would bounce it between workers */
        if (atomic_load_explicit(&hs->consecutive, memory_order_relaxed) != 0)
            atomic_store_explicit(&hs->consecutive, 0, memory_order_relaxed);
        return;
    }
    if (!b->outlier.enabled)
        return;
    unsigned run = atomic_fetch_add_explicit(&hs->consecutive, 1, memory_order_relaxed) + 1;
    if (run == b->outlier.consecutive_failures)
        try_eject(b, s, now_ms, run);
}

/* --- active checks ------------------------------------------------------------------ */

int
gw_cluster_checked(const gw_backend_t *b, const gw_peer_t *s, gw_hc_result_t r, unsigned *in_row)
{
    gw_hserver_t *hs = s->hs;
    const gw_hc_conf_t *hc = b->health_check;
    if ((unsigned)r >= GW_HC_MAX)
        r = GW_HC_BAD_RESPONSE;
    atomic_fetch_add_explicit(&hs->checks[r], 1, memory_order_relaxed);
    bool healthy = atomic_load_explicit(&hs->healthy, memory_order_relaxed);
    unsigned row;
    int change = 0;
    if (r == GW_HC_OK) {
        atomic_store_explicit(&hs->check_fail_row, 0, memory_order_relaxed);
        row = atomic_fetch_add_explicit(&hs->check_ok_row, 1, memory_order_relaxed) + 1;
        if (!healthy && hc != NULL && row >= hc->healthy) {
            atomic_store_explicit(&hs->healthy, true, memory_order_relaxed);
            change = 1;
        }
    } else {
        atomic_store_explicit(&hs->check_ok_row, 0, memory_order_relaxed);
        row = atomic_fetch_add_explicit(&hs->check_fail_row, 1, memory_order_relaxed) + 1;
        if (healthy && hc != NULL && row >= hc->unhealthy) {
            atomic_store_explicit(&hs->healthy, false, memory_order_relaxed);
            change = -1;
        }
    }
    if (in_row)
        *in_row = row;
    return change;
}

const char *
gw_hc_result_name(gw_hc_result_t r)
{
    static const char *const names[GW_HC_MAX] = {"ok", "status", "timeout", "connect", "tls", "bad_response"};
    return (unsigned)r < GW_HC_MAX ? names[r] : "bad_response";
}

/* --- observability ------------------------------------------------------------------- */

void
gw_cluster_stats(const gw_peer_t *s, uint64_t now_ms, gw_hserver_stats_t *out)
{
    const gw_hserver_t *hs = s->hs;
    memset(out, 0, sizeof(*out));
    out->healthy = atomic_load_explicit(&hs->healthy, memory_order_relaxed);
    uint64_t until = atomic_load_explicit(&hs->ejected_until_ms, memory_order_relaxed);
    out->ejected = until > now_ms;
    out->ejected_for_ms = out->ejected ? until - now_ms : 0;
    out->ejections_in_row = atomic_load_explicit(&hs->ejections_in_row, memory_order_relaxed);
    out->consecutive_failures = atomic_load_explicit(&hs->consecutive, memory_order_relaxed);
    out->check_successes = atomic_load_explicit(&hs->check_ok_row, memory_order_relaxed);
    out->check_failures = atomic_load_explicit(&hs->check_fail_row, memory_order_relaxed);
    out->inflight = atomic_load_explicit(&hs->inflight, memory_order_relaxed);
    out->requests = atomic_load_explicit(&hs->requests, memory_order_relaxed);
    for (size_t i = 0; i < GW_FAIL_MAX; i++)
        out->failures[i] = atomic_load_explicit(&hs->failures[i], memory_order_relaxed);
    out->ejections = atomic_load_explicit(&hs->ejections, memory_order_relaxed);
    for (size_t i = 0; i < GW_HC_MAX; i++)
        out->checks[i] = atomic_load_explicit(&hs->checks[i], memory_order_relaxed);
}

const char *
gw_cluster_balance_name(int balance)
{
    switch (balance) {
    case GW_BAL_LEAST: return "least_request";
    case GW_BAL_HASH: return "hash";
    default: return "round_robin";
    }
}
