/*
 * gw_cache.c - the answer cache and the coalescing of calls in flight
 * (see gw_cache.h for the contract).
 *
 * One table of nodes (chained hashing, its bucket count fixed by
 * cache.max_bytes so it never grows under the lock on the request path),
 * one LRU list of the nodes that hold a value, one mutex over both. A node
 * is a key of a scope with a value, a flight, or both (a stale value being
 * revalidated, or kept for stale-if-error while its key is asked again).
 * A node with neither leaves the table. Each scope lists its nodes, so a
 * retired scope drops its entries without a walk of the whole table.
 *
 * Counters are relaxed atomics (per scope and process-wide) read by the
 * admin thread; entry and byte counts change under the lock and are read
 * with atomic loads.
 */
#include "gw_cache.h"

#include "gw_config.h"
#include "gw_log.h"
#include "gw_metrics.h"

#include <event2/buffer.h>
#include <llhttp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

typedef struct node_s node_t;

struct gw_cache_scope_s {
    int refcnt; /* atomic */
    uint64_t id;
    gw_cache_conf_t conf;
    char *route, *call, *backend, *conn_key;
    bool retired;        /* under the lock */
    node_t *nodes;       /* under the lock: its nodes, through snext/sprev */
    gw_cache_stats_t st; /* counters atomic; entries and bytes changed under the lock */
};

struct gw_cache_flight_s {
    node_t *node;
    gw_cache_waiter_t *head, *tail; /* waiting, in arrival order */
};

struct node_s {
    node_t *hnext;           /* bucket chain */
    node_t *lprev, *lnext;   /* LRU, while val is set (lhead: most recent) */
    node_t *sprev, *snext;   /* the scope's */
    gw_cache_scope_t *scope; /* borrowed: a scope drops its nodes before it is freed */
    uint64_t hash;
    gw_cache_val_t *val; /* a reference, or NULL */
    gw_cache_flight_t *flight;
    size_t cost; /* bytes counted for it while val is set */
    size_t klen;
    char key[];
};

static struct {
    pthread_mutex_t mu;
    node_t **buckets;
    size_t nbuckets; /* a power of two */
    node_t *lhead, *ltail;
    size_t max_bytes;    /* atomic reads */
    gw_cache_stats_t st; /* process-wide sums */
    uint64_t next_id;    /* atomic */
} cache = {.mu = PTHREAD_MUTEX_INITIALIZER, .max_bytes = GW_CACHE_DEFAULT_MAX_BYTES};

#define CNT(p)   __atomic_add_fetch((p), 1, __ATOMIC_RELAXED)
#define LD(p)    __atomic_load_n((p), __ATOMIC_RELAXED)
#define ST(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)

/* What an entry costs beyond its key and body: the node, the value and
 * the allocator's headers, roughly. */
#define ENTRY_OVERHEAD 128

/* --- values ------------------------------------------------------------------ */

gw_cache_val_t *
gw_cache_val_new(int status, char *body, size_t len, uint64_t now_ms)
{
    gw_cache_val_t *v = gw_calloc(1, sizeof(*v));
    v->refcnt = 1;
    v->status = status;
    v->body = body;
    v->len = len;
    v->stored_ms = v->fresh_ms = v->swr_ms = v->sie_ms = now_ms;
    return v;
}

gw_cache_val_t *
gw_cache_val_ref(gw_cache_val_t *v)
{
    __atomic_add_fetch(&v->refcnt, 1, __ATOMIC_RELAXED);
    return v;
}

void
gw_cache_val_unref(gw_cache_val_t *v)
{
    if (v == NULL || __atomic_sub_fetch(&v->refcnt, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    free(v->body);
    free(v);
}

/* Under the lock: drops a reference; the last one is put on *later, to be
 * freed once the lock is released. */
static void
val_drop_locked(gw_cache_val_t *v, gw_cache_val_t **later)
{
    if (__atomic_sub_fetch(&v->refcnt, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    v->free_next = *later;
    *later = v;
}

static void
vals_free(gw_cache_val_t *v)
{
    while (v) {
        gw_cache_val_t *next = v->free_next;
        free(v->body);
        free(v);
        v = next;
    }
}

/* --- the table (under the lock) ---------------------------------------------- */

static uint64_t
hash_of(uint64_t id, const char *key, size_t len)
{
    /* FNV-1a, seeded with the scope id */
    uint64_t h = 1469598103934665603ULL ^ (id * 0x9E3779B97F4A7C15ULL);
    for (size_t i = 0; i < len; i++) {
        h ^= (unsigned char)key[i];
        h *= 1099511628211ULL;
    }
    return h ^ (h >> 29);
}

static size_t
buckets_for(size_t max_bytes)
{
    size_t n = 1024;
    while (n < ((size_t)1 << 20) && n * 2048 < max_bytes)
        n *= 2;
    return n;
}

/* Makes the table nbuckets long, moving every node (main thread, rare). */
static void
table_resize(size_t nbuckets)
{
    node_t **b = gw_calloc(nbuckets, sizeof(node_t *));
    for (size_t i = 0; i < cache.nbuckets; i++) {
        node_t *n = cache.buckets[i];
        while (n) {
            node_t *next = n->hnext;
            node_t **slot = &b[n->hash & (nbuckets - 1)];
            n->hnext = *slot;
            *slot = n;
            n = next;
        }
    }
    free(cache.buckets);
    cache.buckets = b;
    cache.nbuckets = nbuckets;
}

static node_t *
table_find(const gw_cache_scope_t *s, uint64_t h, const char *key, size_t klen)
{
    if (cache.buckets == NULL)
        table_resize(buckets_for(LD(&cache.max_bytes)));
    for (node_t *n = cache.buckets[h & (cache.nbuckets - 1)]; n; n = n->hnext)
        if (n->hash == h && n->scope == s && n->klen == klen && memcmp(n->key, key, klen) == 0)
            return n;
    return NULL;
}

static node_t *
node_add(gw_cache_scope_t *s, uint64_t h, const char *key, size_t klen)
{
    node_t *n = gw_calloc(1, sizeof(node_t) + klen);
    n->scope = s;
    n->hash = h;
    n->klen = klen;
    memcpy(n->key, key, klen);
    node_t **slot = &cache.buckets[h & (cache.nbuckets - 1)];
    n->hnext = *slot;
    *slot = n;
    n->snext = s->nodes;
    if (s->nodes)
        s->nodes->sprev = n;
    s->nodes = n;
    return n;
}

/* Removes n (no value, no flight) from the table and its scope, and frees it. */
static void
node_remove(node_t *n)
{
    node_t **p = &cache.buckets[n->hash & (cache.nbuckets - 1)];
    while (*p != n)
        p = &(*p)->hnext;
    *p = n->hnext;
    if (n->sprev)
        n->sprev->snext = n->snext;
    else
        n->scope->nodes = n->snext;
    if (n->snext)
        n->snext->sprev = n->sprev;
    free(n);
}

static void
lru_unlink(node_t *n)
{
    if (n->lprev)
        n->lprev->lnext = n->lnext;
    else
        cache.lhead = n->lnext;
    if (n->lnext)
        n->lnext->lprev = n->lprev;
    else
        cache.ltail = n->lprev;
    n->lprev = n->lnext = NULL;
}

static void
lru_push(node_t *n)
{
    n->lprev = NULL;
    n->lnext = cache.lhead;
    if (cache.lhead)
        cache.lhead->lprev = n;
    cache.lhead = n;
    if (cache.ltail == NULL)
        cache.ltail = n;
}

static void
lru_touch(node_t *n)
{
    if (cache.lhead == n)
        return;
    lru_unlink(n);
    lru_push(n);
}

/* Drops n's value (its bytes no longer counted); n itself goes when it has
 * no flight either. */
static void
node_drop_val(node_t *n, gw_cache_val_t **later)
{
    if (n->val == NULL)
        return;
    lru_unlink(n);
    val_drop_locked(n->val, later);
    n->val = NULL;
    gw_cache_scope_t *s = n->scope;
    ST(&s->st.entries, s->st.entries - 1);
    ST(&s->st.bytes, s->st.bytes - n->cost);
    ST(&cache.st.entries, cache.st.entries - 1);
    ST(&cache.st.bytes, cache.st.bytes - n->cost);
    n->cost = 0;
    if (n->flight == NULL)
        node_remove(n);
}

/* Evicts least recently used entries until need more bytes fit. */
static void
evict_for(size_t need, gw_cache_val_t **later)
{
    size_t max = LD(&cache.max_bytes);
    while (cache.ltail && cache.st.bytes + need > max) {
        node_t *n = cache.ltail;
        CNT(&n->scope->st.evictions);
        CNT(&cache.st.evictions);
        node_drop_val(n, later);
    }
}

/* --- settings and scopes ------------------------------------------------------- */

static bool
same_str(const char *a, const char *b)
{
    return (a == NULL && b == NULL) || (a && b && strcmp(a, b) == 0);
}

gw_cache_scope_t *
gw_cache_scope_new(const gw_cache_conf_t *conf, const char *route, const char *call, const char *backend,
                   const char *conn_key)
{
    gw_cache_scope_t *s = gw_calloc(1, sizeof(*s));
    s->refcnt = 1;
    s->id = __atomic_add_fetch(&cache.next_id, 1, __ATOMIC_RELAXED);
    s->conf = *conf;
    s->route = gw_strdup(route);
    s->call = gw_strdup(call);
    s->backend = gw_strdup(backend);
    s->conn_key = conn_key ? gw_strdup(conn_key) : NULL;
    return s;
}

/* Reads a non-negative number of milliseconds (or bytes) at key of obj. */
static int
get_num(const json_t *obj, const char *key, long long min, long long max, long long *out, const char **where, char *err,
        size_t errlen)
{
    const json_t *v = json_object_get(obj, key);
    if (v == NULL)
        return GW_OK;
    *where = key;
    if (!json_is_integer(v)) {
        snprintf(err, errlen, "must be an integer");
        return GW_ERR;
    }
    if (json_integer_value(v) < min || json_integer_value(v) > max) {
        snprintf(err, errlen, "must be between %lld and %lld, not %lld", min, max, (long long)json_integer_value(v));
        return GW_ERR;
    }
    *out = json_integer_value(v);
    return GW_OK;
}

gw_cache_scope_t *
gw_cache_scope_parse(const json_t *cache_v, const json_t *coalesce_v, const char *route, const char *call,
                     const char *backend, const char *conn_key, int method, bool forward_body, const char **where,
                     char *err, size_t errlen)
{
    static const char *const keys[] = {
        "ttl_ms", "stale_while_revalidate_ms", "stale_if_error_ms", "honor_cache_control", "max_entry_bytes", NULL};
    gw_cache_conf_t conf = {.ttl_ms = 5000, .honor_cache_control = true};
    *where = cache_v ? "cache" : "coalesce";
    if (coalesce_v) {
        if (!json_is_boolean(coalesce_v)) {
            *where = "coalesce";
            snprintf(err, errlen, "must be true or false");
            return NULL;
        }
        conf.coalesce = json_is_true(coalesce_v);
    }
    if (cache_v) {
        if (!json_is_object(cache_v)) {
            snprintf(err, errlen, "must be an object like {\"ttl_ms\": 5000}");
            return NULL;
        }
        const char *key;
        json_t *x;
        json_object_foreach((json_t *)cache_v, key, x)
        {
            bool ok = false;
            for (const char *const *k = keys; *k; k++)
                ok = ok || strcmp(*k, key) == 0;
            if (!ok) {
                snprintf(err, errlen, "unknown key \"%s\" in \"cache\"", key);
                return NULL;
            }
        }
        long long ttl = conf.ttl_ms, swr = 0, sie = 0, maxe = 0;
        if (get_num(cache_v, "ttl_ms", 1, 86400000, &ttl, where, err, errlen) ||
            get_num(cache_v, "stale_while_revalidate_ms", 0, 86400000, &swr, where, err, errlen) ||
            get_num(cache_v, "stale_if_error_ms", 0, 86400000, &sie, where, err, errlen) ||
            get_num(cache_v, "max_entry_bytes", 1, 1LL << 40, &maxe, where, err, errlen))
            return NULL;
        const json_t *h = json_object_get(cache_v, "honor_cache_control");
        if (h) {
            *where = "honor_cache_control";
            if (!json_is_boolean(h)) {
                snprintf(err, errlen, "must be true or false");
                return NULL;
            }
            conf.honor_cache_control = json_is_true(h);
        }
        *where = "cache";
        conf.cache = true;
        conf.coalesce = true; /* a cache always coalesces its misses */
        conf.ttl_ms = (int)ttl;
        conf.swr_ms = (int)swr;
        conf.sie_ms = (int)sie;
        conf.max_entry_bytes = (size_t)maxe;
        if (coalesce_v && json_is_false(coalesce_v)) {
            *where = "coalesce";
            snprintf(err, errlen, "cannot be false with \"cache\": a cache always shares the request of a miss");
            return NULL;
        }
    }
    if (!conf.coalesce)
        return NULL; /* "coalesce": false alone: nothing to do */
    if (method != HTTP_GET) {
        snprintf(err, errlen, "needs method GET, not %s: only a read can be answered for another request",
                 llhttp_method_name((llhttp_method_t)method));
        return NULL;
    }
    if (forward_body) {
        snprintf(err, errlen, "cannot be used with \"body\": \"forward\" (the client's body is not in the key)");
        return NULL;
    }
    return gw_cache_scope_new(&conf, route, call, backend, conn_key);
}

gw_cache_scope_t *
gw_cache_scope_ref(gw_cache_scope_t *s)
{
    __atomic_add_fetch(&s->refcnt, 1, __ATOMIC_RELAXED);
    return s;
}

/* Drops every value of s; nodes without a flight go (under the lock). */
static void
scope_drop_all(gw_cache_scope_t *s, gw_cache_val_t **later)
{
    node_t *n = s->nodes;
    while (n) {
        node_t *next = n->snext;
        node_drop_val(n, later);
        n = next;
    }
}

void
gw_cache_scope_unref(gw_cache_scope_t *s)
{
    if (s == NULL || __atomic_sub_fetch(&s->refcnt, 1, __ATOMIC_ACQ_REL) != 0)
        return;
    /* no flight is left: a running one holds its configuration, which holds s */
    gw_cache_val_t *later = NULL;
    pthread_mutex_lock(&cache.mu);
    scope_drop_all(s, &later);
    pthread_mutex_unlock(&cache.mu);
    vals_free(later);
    free(s->route);
    free(s->call);
    free(s->backend);
    free(s->conn_key);
    free(s);
}

const gw_cache_conf_t *
gw_cache_scope_conf(const gw_cache_scope_t *s)
{
    return &s->conf;
}

bool
gw_cache_scope_same(const gw_cache_scope_t *a, const gw_cache_scope_t *b)
{
    const gw_cache_conf_t *x = &a->conf, *y = &b->conf;
    return x->cache == y->cache && x->coalesce == y->coalesce && x->ttl_ms == y->ttl_ms && x->swr_ms == y->swr_ms &&
           x->sie_ms == y->sie_ms && x->honor_cache_control == y->honor_cache_control &&
           x->max_entry_bytes == y->max_entry_bytes && strcmp(a->route, b->route) == 0 &&
           strcmp(a->call, b->call) == 0 && strcmp(a->backend, b->backend) == 0 && same_str(a->conn_key, b->conn_key);
}

void
gw_cache_scope_retire(gw_cache_scope_t *s)
{
    gw_cache_val_t *later = NULL;
    pthread_mutex_lock(&cache.mu);
    s->retired = true;
    scope_drop_all(s, &later);
    pthread_mutex_unlock(&cache.mu);
    vals_free(later);
}

static void
stats_copy(gw_cache_stats_t *out, const gw_cache_stats_t *st)
{
    out->hits = LD(&st->hits);
    out->misses = LD(&st->misses);
    out->stale = LD(&st->stale);
    out->stale_error = LD(&st->stale_error);
    out->coalesced = LD(&st->coalesced);
    out->refreshes = LD(&st->refreshes);
    out->stored = LD(&st->stored);
    out->evictions = LD(&st->evictions);
    out->entries = LD(&st->entries);
    out->bytes = LD(&st->bytes);
}

void
gw_cache_scope_stats(gw_cache_scope_t *s, gw_cache_stats_t *out)
{
    stats_copy(out, &s->st);
}

void
gw_cache_stats(gw_cache_stats_t *out)
{
    stats_copy(out, &cache.st);
}

void
gw_cache_inherit(gw_config_t *newc, const gw_config_t *oldc)
{
    if (oldc == NULL)
        return;
    for (size_t r = 0; r < newc->nroutes; r++) {
        gw_route_t *nr = newc->routes[r];
        if (nr->kind != GW_ROUTE_AGGREGATE)
            continue;
        for (size_t k = 0; k < nr->agg.ncalls; k++) {
            gw_call_t *nc = nr->agg.calls[k];
            if (nc->cache == NULL)
                continue;
            for (size_t q = 0; q < oldc->nroutes; q++) {
                const gw_route_t *orr = oldc->routes[q];
                if (orr->kind != GW_ROUTE_AGGREGATE || strcmp(orr->pattern, nr->pattern) != 0)
                    continue;
                for (size_t m = 0; m < orr->agg.ncalls; m++) {
                    const gw_call_t *oc = orr->agg.calls[m];
                    if (oc->cache && oc->cache != nc->cache && gw_cache_scope_same(oc->cache, nc->cache)) {
                        gw_cache_scope_unref(nc->cache);
                        nc->cache = gw_cache_scope_ref(oc->cache);
                    }
                }
            }
        }
    }
}

/* Whether cfg has a call using scope s. */
static bool
config_uses(const gw_config_t *cfg, const gw_cache_scope_t *s)
{
    for (size_t r = 0; r < cfg->nroutes; r++) {
        const gw_route_t *rt = cfg->routes[r];
        if (rt->kind != GW_ROUTE_AGGREGATE)
            continue;
        for (size_t k = 0; k < rt->agg.ncalls; k++)
            if (rt->agg.calls[k]->cache == s)
                return true;
    }
    return false;
}

void
gw_cache_retire_dropped(const gw_config_t *oldc, const gw_config_t *newc)
{
    for (size_t r = 0; r < oldc->nroutes; r++) {
        const gw_route_t *rt = oldc->routes[r];
        if (rt->kind != GW_ROUTE_AGGREGATE)
            continue;
        for (size_t k = 0; k < rt->agg.ncalls; k++) {
            gw_cache_scope_t *s = rt->agg.calls[k]->cache;
            if (s && !config_uses(newc, s)) {
                gw_cache_stats_t st;
                gw_cache_scope_stats(s, &st);
                if (st.entries)
                    gw_log(GW_LOG_NOTICE,
                           "reload: cache of call %s of route %s dropped (%llu entries): its "
                           "settings or backend changed, or it is gone",
                           s->call, s->route, (unsigned long long)st.entries);
                gw_cache_scope_retire(s);
            }
        }
    }
}

void
gw_cache_set_max_bytes(size_t max_bytes)
{
    gw_cache_val_t *later = NULL;
    pthread_mutex_lock(&cache.mu);
    ST(&cache.max_bytes, max_bytes);
    size_t nb = buckets_for(max_bytes);
    if (cache.buckets == NULL || nb != cache.nbuckets)
        table_resize(nb);
    evict_for(0, &later);
    pthread_mutex_unlock(&cache.mu);
    vals_free(later);
}

size_t
gw_cache_max_bytes(void)
{
    return LD(&cache.max_bytes);
}

void
gw_cache_shutdown(void)
{
    gw_cache_val_t *later = NULL;
    pthread_mutex_lock(&cache.mu);
    while (cache.ltail)
        node_drop_val(cache.ltail, &later);
    for (size_t i = 0; i < cache.nbuckets; i++)
        while (cache.buckets[i]) {
            node_t *n = cache.buckets[i];
            cache.buckets[i] = n->hnext;
            free(n); /* a flight left by a worker that never ran; nothing waits on it */
        }
    free(cache.buckets);
    cache.buckets = NULL;
    cache.nbuckets = 0;
    pthread_mutex_unlock(&cache.mu);
    vals_free(later);
}

/* --- keys --------------------------------------------------------------------- */

/* Whether the header line [p, p+len) is one the key leaves out. */
static bool
key_skips(const char *p, size_t len)
{
    static const char *const skip[] = {"host:", "x-request-id:", "x-forwarded-for:", NULL};
    for (const char *const *s = skip; *s; s++) {
        size_t n = strlen(*s);
        if (len >= n && strncasecmp(p, *s, n) == 0)
            return true;
    }
    return false;
}

void
gw_cache_key(gw_tpl_buf_t *out, const char *head, size_t head_len, const char *body, size_t body_len)
{
    out->len = 0;
    const char *end = head + head_len, *p = head;
    bool first = true;
    while (p < end) {
        const char *eol = memchr(p, '\n', (size_t)(end - p));
        const char *next = eol ? eol + 1 : end;
        size_t len = (size_t)((eol ? eol : end) - p);
        if (len && p[len - 1] == '\r')
            len--;
        if (len == 0)
            break; /* the end of the head */
        if (first) {
            /* "METHOD target HTTP/1.1": the version is the same for every call */
            const char *sp = len > 9 ? p + len - 9 : NULL;
            if (sp && memcmp(sp, " HTTP/1.1", 9) == 0)
                len -= 9;
            gw_tpl_buf_add(out, p, len);
            gw_tpl_buf_add(out, "\n", 1);
            first = false;
        } else if (!key_skips(p, len)) {
            gw_tpl_buf_add(out, p, len);
            gw_tpl_buf_add(out, "\n", 1);
        }
        p = next;
    }
    gw_tpl_buf_add(out, "\n", 1);
    if (body && body_len)
        gw_tpl_buf_add(out, body, body_len);
}

/* --- lookups and flights --------------------------------------------------------- */

static gw_cache_waiter_t *
waiter_add(gw_cache_flight_t *f, const gw_cache_ask_t *ask)
{
    gw_cache_waiter_t *w = gw_calloc(1, sizeof(*w));
    w->job.done = ask->done;
    w->job.port = ask->port;
    w->arg = ask->arg;
    w->flight = f;
    w->linked = true;
    w->prev = f->tail;
    if (f->tail)
        f->tail->next = w;
    else
        f->head = w;
    f->tail = w;
    return w;
}

gw_cache_result_t
gw_cache_lookup(gw_cache_scope_t *s, const char *key, size_t klen, uint64_t now_ms, gw_cache_ask_t *ask)
{
    uint64_t h = hash_of(s->id, key, klen);
    gw_cache_val_t *later = NULL;
    gw_cache_result_t res;
    ask->val = NULL;
    ask->flight = NULL;
    ask->waiter = NULL;
    pthread_mutex_lock(&cache.mu);
    node_t *n = table_find(s, h, key, klen);
    if (n && n->val) {
        gw_cache_val_t *v = n->val;
        if (now_ms < v->fresh_ms) {
            lru_touch(n);
            ask->val = gw_cache_val_ref(v);
            CNT(&s->st.hits);
            CNT(&cache.st.hits);
            res = GW_CACHE_HIT;
            goto out;
        }
        if (now_ms < v->swr_ms) {
            lru_touch(n);
            ask->val = gw_cache_val_ref(v);
            CNT(&s->st.stale);
            CNT(&cache.st.stale);
            if (n->flight == NULL && !s->retired) {
                n->flight = gw_calloc(1, sizeof(gw_cache_flight_t));
                n->flight->node = n;
                ask->flight = n->flight;
                CNT(&s->st.refreshes);
                CNT(&cache.st.refreshes);
            }
            res = GW_CACHE_STALE;
            goto out;
        }
        if (now_ms >= v->sie_ms) /* of no use any more */
            node_drop_val(n, &later);
        n = table_find(s, h, key, klen); /* NULL when it went with its value */
    }
    if (n && n->flight) {
        if (ask->port)
            ask->waiter = waiter_add(n->flight, ask);
        CNT(&s->st.coalesced);
        CNT(&cache.st.coalesced);
        res = GW_CACHE_WAIT;
        goto out;
    }
    if (n == NULL)
        n = node_add(s, h, key, klen);
    n->flight = gw_calloc(1, sizeof(gw_cache_flight_t));
    n->flight->node = n;
    ask->flight = n->flight;
    if (ask->port)
        ask->waiter = waiter_add(n->flight, ask);
    CNT(&s->st.misses);
    CNT(&cache.st.misses);
    res = GW_CACHE_LEAD;
out:
    pthread_mutex_unlock(&cache.mu);
    vals_free(later);
    if (ask->waiter)
        gw_tport_hold(ask->port);
    return res;
}

gw_cache_scope_t *
gw_cache_flight_scope(const gw_cache_flight_t *f)
{
    return f->node->scope;
}

void
gw_cache_flight_done(gw_cache_flight_t *f, gw_cache_val_t *val, bool store, gw_fail_t code, int status)
{
    gw_cache_val_t *later = NULL;
    pthread_mutex_lock(&cache.mu);
    node_t *n = f->node; /* n->flight stays f until the end: n is not removed meanwhile */
    gw_cache_scope_t *s = n->scope;
    if (val && store && s->conf.cache && !s->retired) {
        size_t max = LD(&cache.max_bytes);
        size_t cost = ENTRY_OVERHEAD + sizeof(node_t) + n->klen + val->len;
        size_t entry_max = s->conf.max_entry_bytes ? s->conf.max_entry_bytes : max / 8;
        node_drop_val(n, &later); /* the old answer; n stays while it is ours */
        if (cost <= entry_max && cost <= max) {
            evict_for(cost, &later);
            n->val = gw_cache_val_ref(val);
            n->cost = cost;
            lru_push(n);
            ST(&s->st.entries, s->st.entries + 1);
            ST(&s->st.bytes, s->st.bytes + cost);
            ST(&cache.st.entries, cache.st.entries + 1);
            ST(&cache.st.bytes, cache.st.bytes + cost);
            CNT(&s->st.stored);
            CNT(&cache.st.stored);
        }
    }
    gw_cache_val_t *old = NULL;
    bool stale = false;
    if (val == NULL && n->val && gw_now_ms() < n->val->sie_ms) {
        old = n->val; /* stale-if-error */
        stale = true;
    }
    gw_cache_waiter_t *w = f->head;
    size_t nw = 0;
    for (gw_cache_waiter_t *k = w; k; k = k->next) {
        k->linked = false;
        k->code = code;
        k->status = status;
        if (val)
            k->val = gw_cache_val_ref(val);
        else if (old)
            k->val = gw_cache_val_ref(old);
        k->stale = stale;
        nw++;
    }
    if (stale) {
        __atomic_add_fetch(&s->st.stale_error, nw, __ATOMIC_RELAXED);
        __atomic_add_fetch(&cache.st.stale_error, nw, __ATOMIC_RELAXED);
    }
    n->flight = NULL;
    if (n->val == NULL)
        node_remove(n);
    pthread_mutex_unlock(&cache.mu);
    free(f);
    gw_cache_val_unref(val);
    vals_free(later);
    /* each waiter goes back to its worker; from here on they are not ours */
    while (w) {
        gw_cache_waiter_t *next = w->next;
        gw_tport_return(&w->job);
        w = next;
    }
}

void
gw_cache_waiter_cancel(gw_cache_waiter_t *w)
{
    pthread_mutex_lock(&cache.mu);
    bool linked = w->linked;
    if (linked) {
        gw_cache_flight_t *f = w->flight;
        if (w->prev)
            w->prev->next = w->next;
        else
            f->head = w->next;
        if (w->next)
            w->next->prev = w->prev;
        else
            f->tail = w->prev;
        w->linked = false;
    }
    pthread_mutex_unlock(&cache.mu);
    if (linked) {
        gw_tport_unhold(w->job.port);
        free(w);
    } else {
        w->arg = NULL; /* handed back meanwhile: its done callback frees it */
    }
}

void
gw_cache_waiter_free(gw_cache_waiter_t *w)
{
    gw_cache_val_unref(w->val);
    free(w);
}

/* --- reporting ----------------------------------------------------------------------- */

static json_t *
stats_json(const gw_cache_stats_t *st)
{
    return json_pack("{s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I, s:I}", "hits", (json_int_t)st->hits, "misses",
                     (json_int_t)st->misses, "stale", (json_int_t)st->stale, "stale_if_error",
                     (json_int_t)st->stale_error, "coalesced", (json_int_t)st->coalesced, "refreshes",
                     (json_int_t)st->refreshes, "stored", (json_int_t)st->stored, "evictions",
                     (json_int_t)st->evictions, "entries", (json_int_t)st->entries, "bytes", (json_int_t)st->bytes);
}

json_t *
gw_cache_call_json(const gw_call_t *call)
{
    if (call->cache == NULL)
        return NULL;
    gw_cache_stats_t st;
    gw_cache_scope_stats(call->cache, &st);
    json_t *o = stats_json(&st);
    const gw_cache_conf_t *c = &call->cache->conf;
    json_object_set_new(o, "coalesce", json_true());
    if (c->cache)
        json_object_set_new(o, "settings",
                            json_pack("{s:i, s:i, s:i, s:b}", "ttl_ms", c->ttl_ms, "stale_while_revalidate_ms",
                                      c->swr_ms, "stale_if_error_ms", c->sie_ms, "honor_cache_control",
                                      c->honor_cache_control));
    return o;
}

void
gw_cache_metrics(struct evbuffer *out, const gw_config_t *cfg)
{
    static const struct {
        const char *name, *help;
        size_t off;
    } per_call[] = {
        {"gatherd_cache_hits_total", "Call answers served fresh from the cache.", offsetof(gw_cache_stats_t, hits)},
        {"gatherd_cache_misses_total", "Cache lookups that sent an upstream request.",
         offsetof(gw_cache_stats_t, misses)},
        {"gatherd_cache_stale_total", "Stale answers served while a background request revalidated them.",
         offsetof(gw_cache_stats_t, stale)},
        {"gatherd_cache_stale_if_error_total", "Stale answers served in place of a failed call.",
         offsetof(gw_cache_stats_t, stale_error)},
        {"gatherd_cache_coalesced_total", "Calls that shared the upstream request of an identical call in flight.",
         offsetof(gw_cache_stats_t, coalesced)},
        {"gatherd_cache_refreshes_total", "Background revalidations started.", offsetof(gw_cache_stats_t, refreshes)},
        {"gatherd_cache_evictions_total", "Entries evicted (least recently used) to stay within cache.max_bytes.",
         offsetof(gw_cache_stats_t, evictions)},
    };
    gw_cache_stats_t tot;
    gw_cache_stats(&tot);
    for (size_t f = 0; f < GW_NELEM(per_call); f++) {
        evbuffer_add_printf(out, "# HELP %s %s\n# TYPE %s counter\n", per_call[f].name, per_call[f].help,
                            per_call[f].name);
        evbuffer_add_printf(out, "%s %llu\n", per_call[f].name,
                            (unsigned long long)*(const uint64_t *)((const char *)&tot + per_call[f].off));
        for (size_t r = 0; cfg && r < cfg->nroutes; r++) {
            const gw_route_t *rt = cfg->routes[r];
            if (rt->kind != GW_ROUTE_AGGREGATE)
                continue;
            for (size_t k = 0; k < rt->agg.ncalls; k++) {
                if (rt->agg.calls[k]->cache == NULL)
                    continue;
                gw_cache_stats_t st;
                gw_cache_scope_stats(rt->agg.calls[k]->cache, &st);
                evbuffer_add_printf(out, "%s{", per_call[f].name);
                gw_metrics_label(out, "route", rt->pattern);
                evbuffer_add(out, ",", 1);
                gw_metrics_label(out, "call", rt->agg.calls[k]->name);
                evbuffer_add_printf(out, "} %llu\n",
                                    (unsigned long long)*(const uint64_t *)((const char *)&st + per_call[f].off));
            }
        }
    }
    evbuffer_add_printf(out,
                        "# HELP gatherd_cache_bytes Bytes of the entries stored (key, body, bookkeeping).\n"
                        "# TYPE gatherd_cache_bytes gauge\ngatherd_cache_bytes %llu\n"
                        "# HELP gatherd_cache_max_bytes cache.max_bytes.\n"
                        "# TYPE gatherd_cache_max_bytes gauge\ngatherd_cache_max_bytes %zu\n"
                        "# HELP gatherd_cache_entries Entries stored.\n"
                        "# TYPE gatherd_cache_entries gauge\ngatherd_cache_entries %llu\n",
                        (unsigned long long)tot.bytes, gw_cache_max_bytes(), (unsigned long long)tot.entries);
}
