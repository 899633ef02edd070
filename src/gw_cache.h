/*
 * gw_cache.h - the process-wide cache of aggregate calls' answers, and the
 * coalescing of identical calls in flight (README "Caching and
 * coalescing").
 *
 * What is stored: the status and body bytes of an answer the call accepts
 * (200, 203 or 204 with a body that is valid JSON), as an immutable,
 * reference-counted value (gw_cache_val_t) that every worker reads. Never
 * stored: another status (a non-2xx answer fails the call; 201, 202, 206
 * ... are not answers to a plain read), an answer whose Cache-Control says
 * no-store, private or no-cache, or that says Vary: *, one larger than the
 * call's max_entry_bytes (default cache.max_bytes / 8). Parsed trees are
 * never shared: each request parses (or checks) the bytes it copies out.
 *
 * The key (gw_cache_key) is the call's identity (its scope: route pattern
 * and call name, with its cache settings and its backend) plus every byte
 * of the request it sends, but the Host line (the backend's, fixed per
 * scope), X-Request-Id (new per request) and X-Forwarded-For (the client's
 * address): the method, the rendered path and query, every header value a
 * call template rendered or a forwarded header carried (Authorization,
 * Cookie, Accept-Language ...), X-Forwarded-Host and -Proto, and the
 * rendered body. Two requests share an entry only when the backend would
 * have seen the same request, but for its client address and request id.
 *
 * Coalescing: the first lookup of a key with nothing usable stored gets a
 * flight (GW_CACHE_LEAD) and starts the upstream request (gw_fetch.h); a
 * lookup of the same key while it runs joins it (GW_CACHE_WAIT). Every
 * caller that waits (the leader's request too) gets a waiter, which is
 * handed back to its own worker through that worker's port (gw_tpool.h:
 * an eventfd its loop watches) when the flight ends: no callback ever runs
 * on another worker's thread. A waiter whose request ends first is
 * cancelled: unlinked, or, when the flight ended meanwhile, freed by its
 * done callback without being used.
 *
 * Locking: one mutex guards the table, the LRU list, every flight and its
 * waiters, and the byte counts. It is held for a hash lookup and a few
 * pointer moves; never across I/O, parsing, copying a body or freeing one
 * (values dropped under it are freed after it is released). Readers hold
 * a reference to a value, not the lock, while they copy its bytes.
 *
 * Memory: the bytes of stored entries (key, body and bookkeeping) count
 * against cache.max_bytes; storing past it evicts the least recently used
 * entries first. A value still referenced by a reader when it is evicted
 * lives until the reader drops it (the time of one copy).
 *
 * Reload: a call's scope is reference counted and kept by a reload when
 * the call (same route pattern and name) has the same cache settings and
 * the same backend (name and connection settings): its entries and
 * counters carry over. A scope no call of the new configuration keeps is
 * retired: its entries are dropped at once and nothing is stored in it
 * again (requests of the old configuration may still look it up).
 */
#ifndef GW_CACHE_H
#define GW_CACHE_H

#include "gw_core.h"
#include "gw_fail.h"
#include "gw_template.h"
#include "gw_tpool.h"

#include <jansson.h>

struct evbuffer;

#define GW_CACHE_DEFAULT_MAX_BYTES ((size_t)64 << 20)

typedef struct gw_cache_scope_s gw_cache_scope_t;
typedef struct gw_cache_flight_s gw_cache_flight_t;
typedef struct gw_cache_waiter_s gw_cache_waiter_t;
typedef struct gw_cache_val_s gw_cache_val_t;

/* A call's "cache" and "coalesce" settings. */
typedef struct {
    bool cache;               /* "cache" present: answers are stored (and coalesced) */
    bool coalesce;            /* identical calls in flight share one upstream request */
    int ttl_ms;               /* fresh for this long (default 5000) */
    int swr_ms;               /* "stale_while_revalidate_ms" after the ttl (default 0) */
    int sie_ms;               /* "stale_if_error_ms" after the ttl (default 0) */
    bool honor_cache_control; /* max-age / s-maxage shorten the ttl (default true) */
    size_t max_entry_bytes;   /* larger answers are not stored; 0: cache.max_bytes / 8 */
} gw_cache_conf_t;

/* A stored (or delivered) answer. Immutable once published; freed with
 * its last reference. */
struct gw_cache_val_s {
    int refcnt; /* atomic */
    int status;
    uint64_t stored_ms; /* gw_now_ms() when its last byte arrived: Age counts from it */
    uint64_t fresh_ms;  /* served as is until then */
    uint64_t swr_ms;    /* then served stale, and refreshed, until this */
    uint64_t sie_ms;    /* served in place of a failure until this */
    char *body;         /* owned */
    size_t len;
    gw_cache_val_t *free_next; /* the cache's, while being freed */
};

/* How a lookup went. */
typedef enum {
    GW_CACHE_HIT,   /* ask->val: a fresh answer */
    GW_CACHE_STALE, /* ask->val: past its ttl, within stale_while_revalidate_ms; ask->flight set: the caller
                     * starts the refresh (gw_fetch_start) or ends it (gw_cache_flight_done), else one runs */
    GW_CACHE_LEAD,  /* nothing usable: the caller starts the request of ask->flight; ask->waiter waits on it */
    GW_CACHE_WAIT   /* the same request is in flight: ask->waiter waits on it */
} gw_cache_result_t;

/* A lookup's question and answer. */
typedef struct {
    /* in: where a waiter is woken (the caller's worker; NULL: nobody waits, as in unit tests), the
     * callback that runs there with the waiter's job, and the caller's argument */
    gw_tport_t *port;
    void (*done)(gw_tjob_t *job);
    void *arg;
    /* out */
    gw_cache_val_t *val;       /* HIT, STALE: a reference, the caller's */
    gw_cache_flight_t *flight; /* LEAD, and STALE when a refresh is to start */
    gw_cache_waiter_t *waiter; /* LEAD, WAIT (with a port) */
} gw_cache_ask_t;

/*
 * A request waiting for a flight. The cache owns it while it is linked;
 * once the flight ended it is handed to port, and job.done runs on the
 * waiter's worker with the outcome below; the owner frees it there with
 * gw_cache_waiter_free().
 */
struct gw_cache_waiter_s {
    gw_tjob_t job; /* job.done: the ask's done; job.port: its port */
    void *arg;     /* the ask's arg; NULL once cancelled (worker thread only) */
    /* the outcome, written before the hand-over */
    gw_cache_val_t *val; /* a reference: the answer, or with stale an old one; NULL: failed */
    gw_fail_t code;      /* GW_FAIL_NONE, or how the flight failed */
    int status;          /* the backend's status when it answered */
    bool stale;          /* val is an old answer served for the failure (stale-if-error) */
    /* the cache's, under its lock */
    gw_cache_waiter_t *next, *prev;
    gw_cache_flight_t *flight;
    bool linked;
};

/* Counters of a scope (and their sum, process-wide). */
typedef struct {
    uint64_t hits;        /* fresh answers served */
    uint64_t misses;      /* lookups that started an upstream request */
    uint64_t stale;       /* stale answers served while revalidating */
    uint64_t stale_error; /* stale answers served in place of a failure */
    uint64_t coalesced;   /* lookups that joined a request in flight */
    uint64_t refreshes;   /* background revalidations started */
    uint64_t stored;      /* answers stored */
    uint64_t evictions;   /* entries evicted to stay within cache.max_bytes */
    uint64_t entries;     /* stored now */
    uint64_t bytes;       /* their bytes now */
} gw_cache_stats_t;

/* --- settings and scopes (main thread at load and reload) ----------------- */

/*
 * Parses a call's "cache" object (cache_v, may be NULL) and "coalesce"
 * (coalesce_v, may be NULL) into a new scope (one reference) for route
 * pattern route and call name call (both copied), whose backend is named
 * backend with connection settings conn_key (copied; may be NULL: every
 * server's, so that a reload that changes any server drops the entries).
 * method:
 * llhttp's (GET only); forward_body: the call forwards the client's body
 * (refused). NULL with the key at fault in *where ("cache", "ttl_ms" ...)
 * and the reason in err.
 */
gw_cache_scope_t *gw_cache_scope_parse(const json_t *cache_v, const json_t *coalesce_v, const char *route,
                                       const char *call, const char *backend, const char *conn_key, int method,
                                       bool forward_body, const char **where, char *err, size_t errlen);
/* A new scope (one reference) with conf (copied); names as above. */
gw_cache_scope_t *gw_cache_scope_new(const gw_cache_conf_t *conf, const char *route, const char *call,
                                     const char *backend, const char *conn_key);
gw_cache_scope_t *gw_cache_scope_ref(gw_cache_scope_t *s);
/* Drops a reference; the last drops the scope's entries and frees it. NULL is ignored. */
void gw_cache_scope_unref(gw_cache_scope_t *s);
/* Its settings (borrowed, immutable). */
const gw_cache_conf_t *gw_cache_scope_conf(const gw_cache_scope_t *s);
/* Whether a reload may keep a's entries for b (same settings, backend). */
bool gw_cache_scope_same(const gw_cache_scope_t *a, const gw_cache_scope_t *b);
/* Drops s's entries and stores nothing in it any more. */
void gw_cache_scope_retire(gw_cache_scope_t *s);
void gw_cache_scope_stats(gw_cache_scope_t *s, gw_cache_stats_t *out);

/*
 * At a reload (main thread), before newc is published: each call of newc
 * with a scope that the same call of oldc has with the same settings and
 * backend shares oldc's scope instead. gw_cache_retire_dropped(), after the
 * reload succeeded, retires the scopes of oldc that newc does not use.
 */
void gw_cache_inherit(gw_config_t *newc, const gw_config_t *oldc);
void gw_cache_retire_dropped(const gw_config_t *oldc, const gw_config_t *newc);

/* cache.max_bytes (main thread, at start and reload): a lower one evicts
 * down to it at once. */
void gw_cache_set_max_bytes(size_t max_bytes);
size_t gw_cache_max_bytes(void);
/* Frees what the cache holds (at exit, after every worker stopped and
 * every configuration was freed). */
void gw_cache_shutdown(void);

/* --- keys, lookups and flights (any thread) ------------------------------- */

/*
 * The key bytes of a request (out is reset): head, the request head as a
 * call sends it ("GET /path HTTP/1.1\r\nName: value\r\n...\r\n\r\n"), minus
 * its version, Host, X-Request-Id and X-Forwarded-For lines, then body
 * (may be NULL).
 */
void gw_cache_key(gw_tpl_buf_t *out, const char *head, size_t head_len, const char *body, size_t body_len);

/*
 * Looks key up in s at now_ms (gw_now_ms()). See gw_cache_result_t for
 * what ask gets. A waiter (LEAD, WAIT) is made only when ask->port is set:
 * the caller then owes gw_tport_hold(port) was done for it here, and its
 * job comes back through that port exactly once, unless
 * gw_cache_waiter_cancel() unlinks it first.
 */
gw_cache_result_t gw_cache_lookup(gw_cache_scope_t *s, const char *key, size_t klen, uint64_t now_ms,
                                  gw_cache_ask_t *ask);

/*
 * The request of flight f ended (the thread it ran on). val (taken; NULL
 * when it failed with code and the backend's status): the answer, stored
 * when store is true, the scope caches, it fits and the scope is not
 * retired. Every waiter gets val (or, after a failure, the stored answer
 * while within its stale_if_error window, marked stale, else the failure)
 * and is handed back to its port. f is freed.
 */
void gw_cache_flight_done(gw_cache_flight_t *f, gw_cache_val_t *val, bool store, gw_fail_t code, int status);

/* The scope of flight f (borrowed while f runs). */
gw_cache_scope_t *gw_cache_flight_scope(const gw_cache_flight_t *f);

/* The request of w ended first (w's worker): w is unlinked and freed, or,
 * when the flight ended meanwhile, freed when its job comes back. */
void gw_cache_waiter_cancel(gw_cache_waiter_t *w);
/* Frees a waiter back from its flight (its done callback), and its val. */
void gw_cache_waiter_free(gw_cache_waiter_t *w);

/* A new value of status with body (taken over, len bytes), stored_ms now;
 * fresh_ms, swr_ms and sie_ms are the caller's to set. One reference. */
gw_cache_val_t *gw_cache_val_new(int status, char *body, size_t len, uint64_t now_ms);
gw_cache_val_t *gw_cache_val_ref(gw_cache_val_t *v);
void gw_cache_val_unref(gw_cache_val_t *v);

/* --- reporting (admin thread) ---------------------------------------------- */

void gw_cache_stats(gw_cache_stats_t *out);
/* The "cache" object of a call in /status, or NULL when it has no scope. */
json_t *gw_cache_call_json(const gw_call_t *call);
/* Appends the cache's families to a /metrics text: process totals and per
 * call of cfg. */
void gw_cache_metrics(struct evbuffer *out, const gw_config_t *cfg);

#endif
