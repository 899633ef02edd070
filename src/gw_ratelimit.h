/*
 * gw_ratelimit.h - per-route rate limits ("rate_limit"): token buckets
 * shared by every worker of the process, so the configured rate holds for
 * the whole process whatever way SO_REUSEPORT spreads the connections.
 *
 * A limiter is created at configuration load (one per route that has a
 * "rate_limit"), is reference counted, and is immutable except for its
 * buckets, which every worker updates concurrently: the global key is one
 * 64-bit word changed by compare-and-swap; keyed limits ("client",
 * "header:NAME") live in a hash table of 1 to 64 shards, each behind a
 * mutex held only for the lookup and the update of one bucket.
 */
#ifndef GW_RATELIMIT_H
#define GW_RATELIMIT_H

#include "gw_config.h"
#include "gw_core.h"

typedef enum { GW_RL_KEY_GLOBAL = 0, GW_RL_KEY_CLIENT, GW_RL_KEY_HEADER } gw_rl_key_t;

/* The settings of one limit, as configured. */
typedef struct {
    unsigned rate;  /* tokens per period: 1..10000000 */
    int period_ms;  /* 1..86400000; rate / period at most 10 000 000 per second */
    unsigned burst; /* bucket capacity: 1..10000000, default rate */
    gw_rl_key_t key;
    char *header;      /* GW_RL_KEY_HEADER: the header name, owned */
    unsigned max_keys; /* keyed limits: buckets kept, 1..1000000, default 10000 */
} gw_ratelimit_conf_t;

/* Longest header block gw_ratelimit_admit() writes. */
#define GW_RATELIMIT_HDR_MAX 160

/* A new limiter with one reference. conf is copied (header duplicated). */
gw_ratelimit_t *gw_ratelimit_new(const gw_ratelimit_conf_t *conf);
gw_ratelimit_t *gw_ratelimit_ref(gw_ratelimit_t *rl);
/* Drops a reference; the last one frees the limiter and its buckets. NULL is fine. */
void gw_ratelimit_unref(gw_ratelimit_t *rl);
const gw_ratelimit_conf_t *gw_ratelimit_conf(const gw_ratelimit_t *rl);

/* The outcome of one gw_ratelimit_take(). */
typedef struct {
    bool admitted;
    unsigned remaining; /* whole tokens left after this request */
    uint64_t reset_ms;  /* admitted: until the bucket is full again; refused: until one token */
} gw_ratelimit_result_t;

/*
 * Takes one token from the bucket of key (len bytes; ignored for a global
 * limit) at now_ns (CLOCK_MONOTONIC). Thread-safe.
 */
void gw_ratelimit_take(gw_ratelimit_t *rl, const char *key, size_t len, uint64_t now_ns, gw_ratelimit_result_t *res);

/*
 * Applies the limiter to request r (its key: the real client address under
 * cfg from peer_ip, a header's value, or none). Writes the RateLimit-Limit,
 * -Remaining and -Reset header lines to hdr (cap >= GW_RATELIMIT_HDR_MAX;
 * NUL-terminated), *hlen their length. Returns 0 when the request may go
 * on, else the Retry-After in seconds (>= 1).
 */
unsigned gw_ratelimit_admit(gw_ratelimit_t *rl, const gw_config_t *cfg, gw_req_t *r, const char *peer_ip, char *hdr,
                            size_t cap, size_t *hlen);

/* Buckets a keyed limiter holds now (tests, metrics). */
size_t gw_ratelimit_nkeys(gw_ratelimit_t *rl);

/*
 * At a reload, before newc is published: every route of newc whose pattern
 * and methods match a route of oldc with identical rate_limit settings
 * takes over that route's limiter (its buckets), so a reload neither
 * refills nor empties them. Main thread.
 */
void gw_ratelimit_inherit(gw_config_t *newc, const gw_config_t *oldc);

#endif
